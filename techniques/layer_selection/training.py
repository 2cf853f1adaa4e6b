"""Technique 10, layer-specific fine-tuning: only chosen blocks or modules learn, the rest is frozen.

``techniques.layerSelection`` (:class:`kubetune.techniques.layer_selection.LayerSelectionSpec`), applied in
``prepare_model`` once the model (and its PEFT adapters) exist:

* ``layers``: block indices and Python-style ranges over the model's transformer blocks (``3``,
  ``8:12``, ``-4:`` for the last four); an encoder-decoder's index selects that block in both
  stacks (see :mod:`kubetune.trainer.techniques.layers`);
* ``patterns``: globs over parameter names (``*.mlp.*``; ``*`` crosses dots), tried on the name
  with and without PEFT's ``base_model.model.`` prefix;
* ``trainHead`` (default on): the task head stays trainable too.

The union of those stays trainable; every other parameter gets ``requires_grad`` off, so it
receives no gradient, no optimizer state, and ends bit-identical. With an adapter method
(``peft.method`` lora, dora, ia3) the selection applies to the adapters: only the adapters inside
the selection train, and the others stay at their identity initialisation (LoRA's B = 0), so the
model behaves exactly as if they had not been attached — LoRA restricted to the chosen layers.

``learningRates`` gives parameters matching a glob their own peak learning rate (the first
matching entry wins), by splitting the optimizer groups in ``param_groups``; it works with or
without a selection.

The names are checked against the real model: an index outside the model, a range that selects
nothing, or a pattern that matches no parameter is a :class:`kubetune.api.SpecError` whose
problems carry the field path (``spec.techniques.layerSelection.patterns[0]``) and list what the
model does have (block count, parameter names with block indices folded to ``*``).
"""

from __future__ import annotations

from typing import Any

from kubetune.api import Problem, SpecError
from kubetune.trainer.grouping import split_groups
from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.techniques.layers import anatomy, describe_names, matching, resolve_index

WHERE = "spec.techniques.layerSelection"


class LayerSelection(Technique):
    name = "layerSelection"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.selected: list[str] = []

    def selection(self, model: Any) -> tuple[set[str], list[Problem]]:
        """Names the config selects, and the problems found resolving it against ``model``."""
        c = self.config
        parts = anatomy(model)
        names = parts.names
        problems: list[Problem] = []
        chosen: set[str] = set()
        if c.layers:
            if not parts.depth:
                problems.append(Problem(f"{WHERE}.layers", f"{type(model).__name__} has no list of transformer blocks to index; use patterns over: {describe_names(names)}"))
            else:
                for i, token in enumerate(c.layers):
                    resolved = resolve_index(token, parts.depth)
                    if isinstance(resolved, str):
                        problems.append(Problem(f"{WHERE}.layers[{i}]", resolved))
                        continue
                    for index in resolved:
                        chosen.update(parts.block(index))
        for i, pattern in enumerate(c.patterns or []):
            found = matching(names, pattern)
            if not found:
                problems.append(Problem(
                    f"{WHERE}.patterns[{i}]",
                    f"{pattern!r} matches no parameter of the model; it has: {describe_names(names)}",
                ))
            chosen.update(found)
        if c.train_head:
            chosen.update(parts.head)
        return chosen, problems

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        c = self.config
        if not c.layers and not c.patterns:
            return model  # only per-group learning rates
        chosen, problems = self.selection(model)
        if problems:
            raise SpecError(problems)
        params = dict(model.named_parameters())
        trainable_before = {n for n, p in params.items() if p.requires_grad}
        keep = chosen & trainable_before
        if not keep:
            raise SpecError([Problem(
                WHERE,
                f"selects no trainable parameter (peft.method {self.spec.peft.method}); trainable before the selection: "
                f"{describe_names(sorted(trainable_before, key=list(params).index))}",
            )])
        for name, param in params.items():
            param.requires_grad_(name in keep)
        self.selected = [n for n in params if n in keep]
        ctx.state[self.name] = {"trainable": len(self.selected)}
        return model

    def param_groups(self, ctx: TechniqueContext, model: Any, groups: list[dict]) -> list[dict]:
        rates = self.config.learning_rates
        if not rates:
            return groups
        names_of = {id(p): n for n, p in model.named_parameters()}
        trainable = [n for g in groups for n in (g.get("param_names") or [names_of[id(p)] for p in g["params"]])]
        problems = [
            Problem(f"{WHERE}.learningRates[{i}].pattern", f"{r.pattern!r} matches no trainable parameter; trainable are: {describe_names(trainable)}")
            for i, r in enumerate(rates)
            if not matching(trainable, r.pattern)
        ]
        if problems:
            raise SpecError(problems)
        return split_groups(
            model, groups, lambda name: next((i for i, r in enumerate(rates) if matching([name], r.pattern)), -1),
            range(-1, len(rates)), lambda group, index: {
                "lr": rates[index].learning_rate if index >= 0 else group["lr"],
                "name": f"{group.get('name', 'default')}" + (f"/lr[{index}]" if index >= 0 else "")})

    def describe(self, ctx: TechniqueContext) -> str | None:
        return f"{len(self.selected)} parameter tensors trainable, the rest frozen"
