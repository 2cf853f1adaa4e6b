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
- ``on_train_start(ctx)``: once, after the DeepSpeed engine is built and a checkpoint resumed
  (``ctx.engine`` and ``ctx.step`` set), before the first step: changes that must come after the
  optimizer exists (gradual unfreezing freezes here, so ZeRO partitions every parameter it will
  ever train).
- ``on_step_end(ctx)``: after each optimizer step (gradual unfreezing, schedules).
- ``on_evaluate(ctx, metrics)``: after each evaluation; set ``ctx.should_stop`` and
  ``ctx.stop_reason`` to end training early.

Exactly where the loop calls them (``kubetune.trainer.training.Trainer``):

1. ``transform_examples`` once per split, right after the raw examples are read and checked
   (``kubetune.trainer.encoding``: canonical keys per format plus ``_dataset``, ``_task``,
   ``_format``, ``_origin``, ``_row``; setting ``_template`` re-templates an instruction). Label
   names are computed after it, so added examples may bring labels. Special tokens added to
   ``ctx.tokenizer`` here are honoured (the model's embeddings are resized before PEFT wrapping).
2. ``prepare_model`` once, after the model is loaded with its head and wrapped by PEFT, before
   the parameter groups and the DeepSpeed engine exist. Return the model to use.
3. ``param_groups`` once: the default is one group of every parameter with ``requires_grad``
   (``{"params", "param_names", "lr", "weight_decay": 0.0, "name": "default"}``); empty groups are
   dropped afterwards. The LR schedule scales every group's ``lr``.
4. ``order_batches`` at the start of every epoch (and again for the epoch a resumed run is in),
   with ``ctx.epoch`` set to the epoch number; the first plugin returning a list wins. It must be
   deterministic for a given epoch (resume depends on it). The list may be longer or shorter than
   the dataset (pacing); the run still stops at its total step count.
5. ``augment`` on every training example as the micro-batch is collated, with a
   ``random.Random`` seeded by (seed, epoch, example index).
6. ``compute_loss`` after every forward pass of a training micro-batch, chained in registry
   order (each gets the previous plugin's loss); ``outputs`` is None when ``training.packing`` is
   on (the fused loss keeps no logits). ``batch`` holds tensors plus ``_index`` (example indices)
   and ``_task`` (task names); ``model`` is the module DeepSpeed wraps (a PEFT model or a
   transformers model). ``ctx.loss_terms`` is cleared before each micro-batch.
7. ``on_step_end`` after every optimizer step, with ``ctx.step`` already counting it.
8. ``on_evaluate`` after every evaluation, including the one before training starts (step 0)
   on a fresh run, with ``ctx.metrics`` and the ``metrics`` argument holding the same dict.

What the context holds besides the spec: ``tokenizer``, ``device``, ``rank``/``world_size``,
``step``/``total_steps``/``epoch``, ``base_dir``/``output_dir``, ``head`` (``spec.head``),
``labels`` (class or tag names, or None), ``model`` and ``engine`` (once built), ``encode``
(example dict → features, as the loop encodes), ``collate`` (features list → batch),
``examples``/``datasets`` (by split, "train" and "eval"), ``micro_batch_size``, ``metrics``
(the latest evaluation).
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
    # Set by a hook (early stopping, on an improved evaluation) to have the loop checkpoint this
    # step, so that the best weights exist on disk to be exported; the loop clears it on saving.
    checkpoint_requested: bool = False
    stop_reason: str | None = None
    state: dict[str, Any] = field(default_factory=dict)  # per-technique scratch space, keyed by name
    # Set by the loop as the run is built (None until then); see "What the context holds" above.
    head: str = "causal-lm"
    labels: list[str] | None = None
    model: Any = None
    engine: Any = None
    encode: Any = None
    collate: Any = None
    examples: dict[str, list[dict]] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    micro_batch_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)


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

    def on_train_start(self, ctx: TechniqueContext) -> None:
        return None

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


#: Techniques the training loop implements itself, so they need no plugin: ``task`` decides the
#: head, the per-format encoding and the metrics (``kubetune.trainer.encoding``/``models``/
#: ``evaluating``). A plugin registered under such a name still has its hooks called.
BUILT_IN = frozenset({"task"})

#: Techniques that arrange runs rather than change one: ``hyperparameterSearch`` runs trials as
#: separate jobs (``kubetune.operator.searching``, ``kubetune.trainer.searching``); the loop of a
#: trial never sees the search block, so no plugin is asked for.
ORCHESTRATION = frozenset({"hyperparameterSearch"})


def enabled_techniques(spec: Any) -> list[Technique]:
    """Instances of the plugins a spec turns on, in the API registry's order."""
    from kubetune.api import TECHNIQUES

    from kubetune.trainer import techniques as _load_all  # noqa: F401  (imports every plugin module)

    out = []
    for name, info in TECHNIQUES.items():
        config = getattr(spec.techniques, info.attribute)
        if config is None or name in ORCHESTRATION:
            continue
        if name not in REGISTRY:
            if name in BUILT_IN:
                continue
            raise NotImplementedError(f"spec.techniques.{name}: no trainer plugin is registered for it")
        out.append(REGISTRY[name](config, spec))
    return out
