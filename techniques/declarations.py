"""What a technique declares about itself: the one record every layer reads.

A technique lives in one folder, ``techniques/<name>/``. Its ``__init__.py`` holds a
:class:`Declaration` named ``DECLARATION`` — torch-free, so the API, the operator, ``kubetune crd``
and the docs generator can read it — and its ``training.py`` holds the trainer plugin (a
``kubetune.trainer.techniques.base.Technique``), imported only by the trainer. The declaration says:

* **who it is**: its YAML key under ``spec.techniques``, its number in the brief and its title, as
  data (the CRD's field description ``"6 · Knowledge distillation from a teacher."`` is made from
  them, never parsed back);
* **its API model**: the pydantic block users write (its docstring is the summary docs show);
* **its rules**: functions of the whole spec that return :class:`~kubetune.api.problems.Problem`\\ s
  with field paths, run with the API's cross-field rules;
* **what it needs of the data path** (:meth:`Declaration.requirements`): :class:`Requirement`\\ s
  of the :class:`Capability` kinds below, each with the reason a user reads. The core turns them
  into the rules and defaults that used to be written out per technique (packing refused or
  off by default, evaluation data needed, ZeRO-3 refused, preference data needed) and into the
  trainer's knowledge of who owns the task loss;
* **its hooks**: ``trainer`` names the plugin class (``"<module>:<Class>"``); a technique that
  arranges runs instead of changing one (hyperparameter search) names an ``operator`` hook module
  instead (see :class:`RunArranger`) and a ``local`` one that runs them one after another in
  ``kubetune train``; the trainer of each run never sees it.

Plugins never import each other: what one must know of another goes through capabilities
(``PROVIDES_TASK_LOSS``) and the shared trainer context.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kubetune.api.base import SpecModel
from kubetune.api.problems import Problem

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class Capability(enum.Enum):
    """Something a technique asks of (or gives to) the shared data path and training loop."""

    #: Reads the logits of each example from the forward pass: the fused loss of packed batches keeps
    #: none, so ``training.packing: true`` is refused and unset packing stays off.
    NEEDS_LOGITS = "needs-logits"
    #: Handles whole sequences one by one (chosen/rejected pairs, virtual tokens): no packing.
    NEEDS_SEQUENCES = "needs-sequences"
    #: Packs documents into blocks itself: ``training.packing`` unset stays off.
    PACKS_ITSELF = "packs-itself"
    #: Needs evaluation data (``spec.data.eval``).
    NEEDS_EVAL_DATA = "needs-eval-data"
    #: Trains on preference data (prompt, chosen, rejected): every training dataset must be in
    #: format ``preference``; preference data with no such technique is refused.
    NEEDS_PREFERENCE_DATA = "needs-preference-data"
    #: Reads every trainable weight whole (penalties towards the start): ZeRO-3 is refused.
    READS_FULL_WEIGHTS = "reads-full-weights"
    #: Computes the task's cross-entropy itself (and applies ``ctx.label_smoothing`` to it), so no
    #: other technique adds a term to that cross-entropy.
    PROVIDES_TASK_LOSS = "provides-task-loss"
    #: Arranges runs (trials) instead of changing one: the operator hook creates them, the trainer
    #: of a run never sees this technique.
    ARRANGES_RUNS = "arranges-runs"


@dataclass(frozen=True)
class Requirement:
    """One capability a configured technique needs, with the reason shown to the user.

    ``path`` is the field the reason is about, relative to ``spec.techniques.<key>`` (``""`` for
    the block itself); ``reason`` completes "…; turn packing off", "… needs evaluation data", etc.
    """

    capability: Capability
    reason: str
    path: str = ""


Rule = Callable[["FineTuneJobSpec"], Iterator[Problem]]


class RunArranger(Protocol):
    """The operator hook of a technique that arranges runs (``Capability.ARRANGES_RUNS``).

    The module named by ``Declaration.operator`` provides these functions; the kopf handlers call
    them instead of creating trainer pods for a FineTuneJob that turns the technique on, and on
    every event of a FineTuneJob carrying ``CHILD_LABEL`` (one of its runs).
    """

    CHILD_LABEL: str
    #: One line for ``kubetune render``: what the objects it shows for such a job are.
    RENDER_NOTE: str

    async def ensure_runs(self, body: dict[str, Any], settings: Any) -> None: ...

    def first_runs(self, job: Any) -> list[dict[str, Any]]: ...

    async def reconcile(self, namespace: str, name: str, settings: Any) -> None: ...

    def parent_name(self, child: dict[str, Any]) -> str | None: ...


@dataclass(frozen=True)
class Declaration:
    """A technique, as every layer sees it (see the module doc)."""

    key: str  # YAML key under spec.techniques, camelCase
    number: int  # its number in the brief (docs order, CRD description)
    title: str  # short, for the CRD field description and the docs table
    spec: type[SpecModel]  # the block's model; its docstring is the summary docs show
    capabilities: frozenset[Capability] = frozenset()  # every capability requirements() may return
    requires: Callable[[Any], Iterable[Requirement]] | None = None  # config -> what it needs now
    rules: tuple[Rule, ...] = ()
    #: Per capability, the field (inside the block) that turns it on: hints in refusals such as
    #: "preference data is only used by spec.techniques.controlledGeneration.dpo".
    switches: Mapping[Capability, str] = field(default_factory=dict)
    trainer: str | None = None  # "module:Class" of the trainer plugin
    operator: str | None = None  # module of the operator hook (a RunArranger)
    local: str | None = None  # "module:function" running the runs in `kubetune train` (job, paths, options) -> exit code

    @property
    def attribute(self) -> str:
        """The Python attribute on the techniques block (snake_case of the key)."""
        return "".join(f"_{c.lower()}" if c.isupper() else c for c in self.key)

    @property
    def description(self) -> str:
        """The block's description in the CRD and ``kubectl explain``: number and title."""
        return f"{self.number} · {self.title}."

    @property
    def summary(self) -> str:
        """One sentence on what the technique does (the spec model's docstring)."""
        return (self.spec.__doc__ or "").strip()

    def requirements(self, config: Any) -> list[Requirement]:
        """What this technique, configured as ``config``, needs of the data path and the loop."""
        found = list(self.requires(config)) if self.requires is not None else []
        undeclared = [r.capability for r in found if r.capability not in self.capabilities]
        if undeclared:
            raise ValueError(f"technique {self.key!r} requires {undeclared} without declaring them in capabilities")
        return found

    def where(self, path: str = "") -> str:
        """The field path of this block (or of ``path`` inside it) in a manifest."""
        return f"spec.techniques.{self.key}" + (f".{path}" if path else "")
