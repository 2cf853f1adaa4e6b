"""The trainer side of a technique: one small interface, loaded from the technique registry.

A technique plugin is a class in its technique's folder (``techniques/<name>/training.py``), named
by the technique's declaration (``Declaration.trainer``, see ``kubetune.techniques``), with a
``name`` equal to its YAML key under ``spec.techniques`` and any of the hooks below; the training
loop (``kubetune.trainer.training``) calls every enabled plugin's hooks in registry order. A hook a
plugin does not need is simply inherited from ``Technique`` and does nothing. Plugins never import
each other: what one must know of another is in the context (``ctx.capabilities``: which enabled
techniques declared which capability; ``ctx.label_smoothing``; ``ctx.state``).

The hooks, in the order the loop calls them:

- ``on_setup(ctx)``: once, as soon as the context exists: publish what other plugins read from the
  context (regularisation's ``ctx.label_smoothing``).

- ``transform_examples(ctx, examples, split)``: rewrite the list of raw example dicts of a split
  before tokenisation (templates, control codes, replay, task prefixes). ``split`` is "train" or
  "eval".
- ``start_weights(ctx, model)``: right after the model is built from ``model.source``, before
  any ``prepare_model``: load other weights into it (continual learning starts from an earlier
  job with ``kubetune.trainer.weights``), so anchors taken later see them.
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
- ``describe(ctx)``: once, when training ends (rank 0): one line saying what the technique did
  (examples augmented, the curriculum stage reached, the last adversarial or KL term, blocks
  unfrozen…), or None. The loop prints the lines under a ``techniques:`` header — in the terminal
  of a local run and in the pod's log.

Exactly where the loop calls them (``kubetune.trainer.training.Trainer``):

0. ``on_setup`` once per plugin, right after the context is built (before any data is read).
1. ``transform_examples`` once per split (``split`` is "train" or "eval"; "preview" when
   ``kubetune validate --preview`` shows examples — a plugin that needs the tokenizer, or acts on
   tokens, returns them unchanged there), right after the raw examples are read and checked
   (``kubetune.trainer.encoding``: canonical keys per format plus ``_dataset``, ``_task``,
   ``_format``, ``_origin``, ``_row``; setting ``_template`` re-templates an instruction). Label
   names are computed after it, so added examples may bring labels. Special tokens added to
   ``ctx.tokenizer`` here are honoured (the model's embeddings are resized before PEFT wrapping).
2. ``start_weights`` once, right after the model is built (head, PEFT wrapping); then
   ``prepare_model`` once, after the model is loaded with its head and wrapped by PEFT, before
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
9. ``describe`` once on rank 0 after the last step (and after a final evaluation), before the export.

What the context holds besides the spec: ``tokenizer``, ``device``, ``rank``/``world_size``,
``step``/``total_steps``/``epoch``, ``base_dir``/``output_dir``, ``head`` (``spec.head``),
``labels`` (class or tag names, or None), ``model`` and ``engine`` (once built), ``encode``
(example dict → features, as the loop encodes), ``collate`` (features list → batch),
``examples``/``datasets`` (by split, "train" and "eval"), ``micro_batch_size``, ``metrics``
(the latest evaluation), ``capabilities`` (capability → keys of the enabled techniques that
declared it, from the spec) and ``label_smoothing`` (published by regularisation for a technique
that ``PROVIDES_TASK_LOSS``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kubetune.techniques import registered
from kubetune.techniques.declarations import Capability, Declaration


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
    # What the enabled techniques declared (capability -> their keys), and what they publish.
    capabilities: dict[Capability, list[str]] = field(default_factory=dict)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not self.capabilities and getattr(self.spec, "techniques", None) is not None:
            self.capabilities = declared_capabilities(self.spec)

    def provided_by_others(self, capability: Capability, me: str) -> list[str]:
        """Keys of the other enabled techniques that declared ``capability``."""
        return [key for key in self.capabilities.get(capability, []) if key != me]


class Technique:
    """Base class of technique plugins; every hook defaults to doing nothing."""

    name: ClassVar[str] = ""

    def __init__(self, config: Any, spec: Any) -> None:
        self.config = config
        self.spec = spec

    def on_setup(self, ctx: TechniqueContext) -> None:
        return None

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        return examples

    def start_weights(self, ctx: TechniqueContext, model: Any) -> None:
        return None

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

    def describe(self, ctx: TechniqueContext) -> str | None:
        return None


def declared_capabilities(spec: Any) -> dict[Capability, list[str]]:
    """Capability -> keys of the techniques the spec turns on that need it, as configured."""
    from kubetune.api.rules import requirements

    out: dict[Capability, list[str]] = {}
    for declaration, need in requirements(spec):
        keys = out.setdefault(need.capability, [])
        if declaration.key not in keys:
            keys.append(declaration.key)
    return out


def plugin_class(declaration: Declaration) -> type[Technique] | None:
    """The trainer plugin a declaration names (None for a technique that arranges runs)."""
    if declaration.trainer is None:
        return None
    module, _, name = declaration.trainer.partition(":")
    found = getattr(importlib.import_module(module), name, None)
    if not (isinstance(found, type) and issubclass(found, Technique)):
        raise TypeError(f"technique {declaration.key!r}: {declaration.trainer} is not a kubetune.trainer.techniques.Technique")
    if found.name != declaration.key:
        raise ValueError(f"technique {declaration.key!r}: its plugin {found.__name__} has name {found.name!r}")
    return found


def arranging_technique(spec: Any) -> Declaration | None:
    """The enabled technique that arranges runs (``Capability.ARRANGES_RUNS``), if any."""
    for declaration in registered().values():
        if Capability.ARRANGES_RUNS in declaration.capabilities and getattr(spec.techniques, declaration.attribute) is not None:
            return declaration
    return None


def local_arranger(declaration: Declaration) -> Any:
    """The function that runs a run-arranging technique's runs in ``kubetune train``."""
    if declaration.local is None:
        raise NotImplementedError(f"{declaration.where()}: `kubetune train` cannot run it (no local hook is declared)")
    module, _, name = declaration.local.partition(":")
    return getattr(importlib.import_module(module), name)


def enabled_techniques(spec: Any) -> list[Technique]:
    """Instances of the plugins a spec turns on, in the registry's order.

    A technique that arranges runs (``Capability.ARRANGES_RUNS``: hyperparameter search) has no
    plugin: its runs are ordinary jobs, and a run never carries its block.
    """
    out = []
    for declaration in registered().values():
        config = getattr(spec.techniques, declaration.attribute)
        if config is None:
            continue
        cls = plugin_class(declaration)
        if cls is None:
            if Capability.ARRANGES_RUNS in declaration.capabilities:
                continue
            raise NotImplementedError(f"spec.techniques.{declaration.key}: no trainer plugin is declared for it")
        out.append(cls(config, spec))
    return out
