"""Technique 3, transfer learning: a pretrained base, a new head, and how much of the base learns.

``techniques.transferLearning`` (:class:`kubetune.techniques.transfer_learning.TransferLearningSpec`):

* ``newHead`` (default on) re-initialises the task head — every parameter outside the backbone
  (``classifier``, ``score``, ``lm_head``, see :mod:`kubetune.trainer.techniques.layers`) — from
  ``training.seed``, so a checkpoint's old head never leaks in. A head tied to the input
  embeddings (GPT-2's ``lm_head``) is part of the base and is left alone.
* ``strategy``:

  - ``full``: every parameter learns;
  - ``linear-probe``: the base is frozen (``requires_grad`` off, so it gets no gradient and no
    optimizer state) and only the head learns: the base weights end bit-identical;
  - ``gradual-unfreeze`` (ULMFiT): stage 0 trains the head only; every ``unfreeze.everySteps``
    optimizer steps the next ``unfreeze.blocksPerStage`` blocks from the top join. The parameters
    above the blocks (final norm, pooler) join with the first blocks, the embeddings below them one
    stage after the last block. The stage follows ``ctx.step``, so a resumed run is at the stage
    it left. Every parameter is trainable while DeepSpeed builds its optimizer (ZeRO partitions
    only those); the freezing of stage 0 happens in ``on_train_start``, after the engine exists.

* ``headLearningRate`` / ``baseLearningRate`` split each optimizer group into a head and a base
  part with their own peak learning rate (the schedule scales both).

A model with no head of its own cannot be probed: that is a :class:`kubetune.api.SpecError` at
model load naming ``spec.techniques.transferLearning.strategy``.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune.api import Problem, SpecError
from kubetune.trainer.grouping import split_groups
from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.techniques.layers import Anatomy, anatomy, unwrap

WHERE = "spec.techniques.transferLearning"


def _reinitialise(module: torch.nn.Module, std: float) -> None:
    """Fresh weights for a head module, the way transformers initialises new heads."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            torch.nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                torch.nn.init.zeros_(sub.bias)
        elif isinstance(sub, torch.nn.Embedding):
            torch.nn.init.normal_(sub.weight, mean=0.0, std=std)
        elif isinstance(sub, torch.nn.LayerNorm) or type(sub).__name__.endswith("RMSNorm"):
            if getattr(sub, "weight", None) is not None:
                torch.nn.init.ones_(sub.weight)
            if getattr(sub, "bias", None) is not None:
                torch.nn.init.zeros_(sub.bias)


class TransferLearning(Technique):
    name = "transferLearning"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.parts: Anatomy | None = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self.stage = -1

    # -- model
    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        parts = anatomy(model)
        self.parts = parts
        self.params = dict(model.named_parameters())
        if self.config.strategy != "full" and not parts.head:
            raise SpecError([Problem(
                f"{WHERE}.strategy",
                f"{self.config.strategy} trains the task head, and this {type(unwrap(model)).__name__} has no head of "
                "its own (its output layer is tied to the input embeddings); use strategy full, or a task with a "
                "separate head (techniques.task.type classification, token-classification, question-answering)",
            )])
        if self.config.new_head and parts.head:
            self._new_head(model, parts)
        if self.config.strategy == "linear-probe":
            for name, param in self.params.items():
                param.requires_grad_(name in parts.head)
        return model

    def _new_head(self, model: Any, parts: Anatomy) -> None:
        inner = unwrap(model)
        std = float(getattr(inner.config, "initializer_range", 0.02) or 0.02)
        head_ids = {id(self.params[n]) for n in parts.head}
        base_ids = {id(p) for n, p in self.params.items() if n not in parts.head}
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.spec.training.seed)
        try:
            with torch.no_grad():
                for _, module in model.named_modules():
                    own = list(module.parameters(recurse=False))
                    if own and all(id(p) in head_ids and id(p) not in base_ids for p in own):
                        _reinitialise(module, std)
        finally:
            torch.random.set_rng_state(generator_state)

    # -- optimizer
    def param_groups(self, ctx: TechniqueContext, model: Any, groups: list[dict]) -> list[dict]:
        c = self.config
        if c.head_learning_rate is None and c.base_learning_rate is None:
            return groups
        head = set(self.parts.head if self.parts else [])
        rates = {"head": c.head_learning_rate, "base": c.base_learning_rate}
        return split_groups(model, groups, lambda n: "head" if n in head else "base", rates, lambda group, part: {
            "lr": rates[part] if rates[part] is not None else group["lr"], "name": f"{group.get('name', 'default')}/{part}"})

    # -- gradual unfreezing
    def stages(self) -> list[list[str]]:
        """Parameter names that join at each stage (stage 0: the head)."""
        assert self.parts is not None
        parts = self.parts
        per = self.config.unfreeze.blocks_per_stage
        order = list(range(parts.depth - 1, -1, -1))
        out = [list(parts.head)]
        for i in range(0, len(order), per):
            names = [n for index in order[i : i + per] for n in parts.block(index)]
            if i == 0:
                names = parts.top + names
            out.append(names)
        if parts.bottom:
            out.append(list(parts.bottom))
        if not parts.depth:  # no blocks found: the whole base is one stage
            out = [list(parts.head), parts.top + parts.bottom]
        return out

    def stage_at(self, step: int) -> int:
        every = self.config.unfreeze.every_steps
        return min(step // every, len(self.stages()) - 1)

    def apply_stage(self, stage: int) -> None:
        trainable = {n for names in self.stages()[: stage + 1] for n in names}
        for name, param in self.params.items():
            param.requires_grad_(name in trainable)
        self.stage = stage

    def on_train_start(self, ctx: TechniqueContext) -> None:
        if self.config.strategy == "gradual-unfreeze":
            self.apply_stage(self.stage_at(ctx.step))

    def on_step_end(self, ctx: TechniqueContext) -> None:
        if self.config.strategy != "gradual-unfreeze":
            return
        stage = self.stage_at(ctx.step)
        if stage != self.stage:
            self.apply_stage(stage)
            ctx.state[self.name] = {"stage": stage, "of": len(self.stages()) - 1}

    def describe(self, ctx: TechniqueContext) -> str | None:
        if self.config.strategy == "gradual-unfreeze":
            return f"gradual unfreezing reached stage {self.stage} of {len(self.stages()) - 1} (blocks unfrozen from the top)"
        return f"strategy {self.config.strategy}" + ("; new head" if self.config.new_head else "")
