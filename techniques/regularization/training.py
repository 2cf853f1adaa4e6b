"""Technique 11, regularisation: weight decay, L1, L2-SP, dropout overrides, label smoothing.

``techniques.regularization`` (:class:`kubetune.techniques.regularization.RegularizationSpec`):

* ``weightDecay`` — decoupled (AdamW, Loshchilov & Hutter) through the optimizer: ``param_groups``
  splits every group into a decaying part and a ``no-decay`` part, the parameters whose names
  match ``noDecayPatterns`` (biases and norms by default). With ``training.optimizer`` adam or
  sgd torch applies the decay as a gradient term (coupled L2) instead.
* ``l1`` — ``l1 · Σ|w|`` over the trainable parameters outside ``noDecayPatterns``, added to the
  loss of each micro-batch (so the optimizer step sees it once per step under accumulation).
* ``l2Sp`` — ``l2Sp · Σ‖w − w₀‖²`` (Li et al., 2018), w₀ the weights at the start of training,
  copied in ``prepare_model``, over the trainable parameters except a task head (which has no
  pretrained value to stay near). With PEFT adapters w₀ is the adapters' initialisation.
* ``dropout`` — every ``nn.Dropout`` of the model (not PEFT's own adapter dropout, which
  ``peft.dropout`` sets), the float dropout attributes of attention modules and the config's
  ``*dropout*``/``*pdrop`` values are set to this probability.
* ``labelSmoothing`` — the task cross-entropy is replaced by the smoothed one (the term added is
  the difference, so other techniques' terms stay). When another enabled technique declares
  ``PROVIDES_TASK_LOSS`` (distillation, DPO) it owns that cross-entropy: the smoothing is then
  published as ``ctx.label_smoothing`` for it to apply, and no term is added here.

Each term is recorded in ``ctx.loss_terms`` (``l1``, ``l2_sp``, ``label_smoothing``) as exactly
what was added to the loss, weight included. L1 and L2-SP read full parameters, which
ZeRO-3 shards; the API refuses them with ``zeroStage: 3``.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from kubetune.techniques.declarations import Capability
from kubetune.trainer.grouping import split_groups
from kubetune.trainer.losses import hard_loss
from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.techniques.layers import anatomy, plain_name

_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "dropout_p", "attn_dropout", "dropout_prob")


def no_decay(name: str, patterns: list[str]) -> bool:
    plain = plain_name(name)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(plain, p) for p in patterns)


def override_dropout(model: torch.nn.Module, p: float) -> int:
    """Set every dropout probability of ``model`` (except PEFT adapter dropout) to ``p``; returns how many."""
    changed = 0
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = p
            changed += 1
            continue
        for attr in _DROPOUT_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, float) and not isinstance(value, bool):
                setattr(module, attr, p)
                changed += 1
    seen: set[int] = set()
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "to_dict"):
            continue
        seen.add(id(config))
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, p)
    return changed


class Regularization(Technique):
    name = "regularization"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.l1_params: list[torch.nn.Parameter] = []
        self.anchors: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def on_setup(self, ctx: TechniqueContext) -> None:
        ctx.label_smoothing = self.config.label_smoothing

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        c = self.config
        if c.dropout is not None:
            ctx.state.setdefault(self.name, {})["dropoutModules"] = override_dropout(model, c.dropout)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if c.l1:
            self.l1_params = [p for n, p in trainable if not no_decay(n, c.no_decay_patterns)]
        if c.l2_sp:
            head = set(anatomy(model).head)
            self.anchors = [
                (p, p.detach().to(device=ctx.device or p.device, dtype=torch.float32, copy=True))
                for n, p in trainable
                if n not in head
            ]
        return model

    def param_groups(self, ctx: TechniqueContext, model: Any, groups: list[dict]) -> list[dict]:
        c = self.config
        if not c.weight_decay:
            return groups
        return split_groups(model, groups, lambda n: not no_decay(n, c.no_decay_patterns), (True, False), lambda group, decays: {
            "weight_decay": c.weight_decay if decays else 0.0, "name": f"{group.get('name', 'default')}/{'decay' if decays else 'no-decay'}"})

    def compute_loss(self, ctx: TechniqueContext, model: Any, batch: dict, outputs: Any, loss: Any) -> Any:
        c = self.config
        smooth = c.label_smoothing and not ctx.provided_by_others(Capability.PROVIDES_TASK_LOSS, self.name)
        if smooth and outputs is not None and "labels" in batch and outputs.logits.shape[-1] > 1:
            labels = batch["labels"].to(outputs.logits.device)
            term = hard_loss(ctx.head, outputs.logits, labels, c.label_smoothing) - hard_loss(ctx.head, outputs.logits, labels, 0.0)
            ctx.loss_terms["label_smoothing"] = float(term.detach())
            loss = loss + term
        live = [p for p in self.l1_params if p.requires_grad]
        if c.l1 and live:
            term = c.l1 * torch.stack([p.abs().sum() for p in live]).sum()
            ctx.loss_terms["l1"] = float(term.detach())
            loss = loss + term
        pairs = [(p, w0) for p, w0 in self.anchors if p.requires_grad]
        if c.l2_sp and pairs:
            term = c.l2_sp * torch.stack([(p.float() - w0).pow(2).sum() for p, w0 in pairs]).sum()
            ctx.loss_terms["l2_sp"] = float(term.detach())
            loss = loss + term
        return loss

    def describe(self, ctx: TechniqueContext) -> str | None:
        c = self.config
        parts = [f"weight decay {c.weight_decay:g}"] if c.weight_decay else []
        for name in ("l1", "l2_sp", "label_smoothing"):
            if name in ctx.loss_terms:
                parts.append(f"last {name} penalty {ctx.loss_terms[name]:.4g}")
        if c.label_smoothing and ctx.provided_by_others(Capability.PROVIDES_TASK_LOSS, self.name):
            parts.append(f"label smoothing {c.label_smoothing:g} applied by {', '.join(ctx.provided_by_others(Capability.PROVIDES_TASK_LOSS, self.name))}")
        if "dropoutModules" in ctx.state.get(self.name, {}):
            parts.append(f"dropout {c.dropout:g} on {ctx.state[self.name]['dropoutModules']} modules")
        return "; ".join(parts) or "no term was active"
