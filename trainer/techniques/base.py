"""The trainer side of a technique: one small interface, one registry.

A technique plugin is a class with a ``name`` equal to its YAML key under ``spec.techniques``
(see ``kubetune.api.techniques.TECHNIQUES``) and any of the hooks below; the training loop
(``kubetune.trainer.training``) calls every enabled plugin's hooks in registry order. A hook a
plugin does not need is simply inherited from ``Technique`` and does nothing. Adding a technique
means one module here plus its ``@register`` line; nothing in the loop changes.

The hooks, in the order the loop calls them:

- ``transform_examples(ctx, examples, split)``: rewrite the list of raw example dicts of a split
  before tokenisation (templates, control codes, replay, task prefixes). ``split`` is "train" or
  "eval".
- ``prepare_model(ctx, model)``: after the model (and PEFT wrapping) is built, before the engine:
  freeze/unfreeze, dropout overrides, anchors for L2-SP/EWC, teacher loading, NEFTune hooks.
- ``param_groups(ctx, model, groups)``: refine the optimizer parameter groups (a list of dicts
  with "params", "lr", "weight_decay", "name"); return the new list.
- ``order_batches(ctx, dataset)``: return a sampler/ordering (a list of example indices per
  epoch) or None to keep the default shuffle (curriculum, multi-task mixing).
- ``augment(ctx, example, rng)``: called on each tokenised training example on the fly; return
  the (possibly) augmented example (data augmentation). Must be deterministic given ``rng``.
- ``compute_loss(ctx, model, batch, outputs, loss)``: return the loss to back-propagate, given
  the base loss; may run extra forward passes (distillation, adversarial, DPO replaces the loss).
  Also record named loss terms in ``ctx.loss_terms`` (e.g. {"kl": 0.3}) for logging and tests.
- ``on_step_end(ctx)``: after each optimizer step (gradual unfreezing, schedules).
- ``on_evaluate(ctx, metrics)``: after each evaluation; set ``ctx.should_stop`` and
  ``ctx.stop_reason`` to end training early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class TechniqueContext:
    """What a hook may read and set. Built once per run by the training loop."""

    spec: Any  # kubetune.api.FineTuneJobSpec
    tokenizer: Any = None
    device: Any = None
    rank: int = 0
    world_size: int = 1
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    base_dir: Any = None  # folder relative data paths resolve against
    output_dir: Any = None
    loss_terms: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False
    stop_reason: str | None = None
    state: dict[str, Any] = field(default_factory=dict)  # per-technique scratch space, keyed by name


class Technique:
    """Base class of technique plugins; every hook defaults to doing nothing."""

    name: ClassVar[str] = ""

    def __init__(self, config: Any, spec: Any) -> None:
        self.config = config
        self.spec = spec

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        return examples

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        return model

    def param_groups(self, ctx: TechniqueContext, model: Any, groups: list[dict]) -> list[dict]:
        return groups

    def order_batches(self, ctx: TechniqueContext, dataset: Any) -> list[int] | None:
        return None

    def augment(self, ctx: TechniqueContext, example: dict, rng: Any) -> dict:
        return example

    def compute_loss(self, ctx: TechniqueContext, model: Any, batch: dict, outputs: Any, loss: Any) -> Any:
        return loss

    def on_step_end(self, ctx: TechniqueContext) -> None:
        return None

    def on_evaluate(self, ctx: TechniqueContext, metrics: dict[str, float]) -> None:
        return None


REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: add a plugin under its ``name``; a duplicate or unknown name is an error."""
    from kubetune.api import TECHNIQUES

    if cls.name not in TECHNIQUES:
        raise ValueError(f"technique plugin {cls.__name__} has name {cls.name!r}, not one of {sorted(TECHNIQUES)}")
    if cls.name in REGISTRY:
        raise ValueError(f"technique {cls.name!r} is registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def enabled_techniques(spec: Any) -> list[Technique]:
    """Instances of the plugins a spec turns on, in the API registry's order."""
    from kubetune.api import TECHNIQUES

    from kubetune.trainer import techniques as _load_all  # noqa: F401  (imports every plugin module)

    out = []
    for name, info in TECHNIQUES.items():
        config = getattr(spec.techniques, info.attribute)
        if config is None:
            continue
        if name not in REGISTRY:
            raise NotImplementedError(f"spec.techniques.{name}: no trainer plugin is registered for it")
        out.append(REGISTRY[name](config, spec))
    return out
