"""Technique 13, early stopping: the ``spec.techniques.earlyStopping`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from kubetune.api.base import SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Capability, Declaration, Requirement

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class EarlyStoppingSpec(SpecModel):
    """Stop when an eval metric stops improving."""

    metric: str = Field(default="eval_loss", max_length=128, pattern=r"^[A-Za-z0-9_./\-]+$", description="Eval metric watched.")
    mode: Literal["min", "max"] = Field(default="min", description="Lower or higher is better.")
    patience: int = Field(default=3, ge=1, le=10000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, le=1e9, description="Smallest change that counts as improvement.")


def _requires(config: EarlyStoppingSpec) -> Iterator[Requirement]:
    yield Requirement(Capability.NEEDS_EVAL_DATA, f"early stopping on {config.metric!r}")


def _keeps_its_best(spec: FineTuneJobSpec) -> Iterator[Problem]:
    es, ck = spec.techniques.early_stopping, spec.checkpointing
    if es is None or (ck.metric == es.metric and ck.mode == es.mode):
        return
    yield Problem(
        "spec.checkpointing.metric",
        f"the best checkpoint (the one exported) is ranked by checkpointing.metric {ck.metric!r} ({ck.mode}), but early "
        f"stopping watches {es.metric!r} ({es.mode}); set checkpointing.metric: {es.metric} and mode: {es.mode}",
    )


DECLARATION = Declaration(
    key="earlyStopping",
    number=13,
    title="Early stopping on an eval metric",
    spec=EarlyStoppingSpec,
    capabilities=frozenset({Capability.NEEDS_EVAL_DATA}),
    requires=_requires,
    rules=(_keeps_its_best,),
    trainer="kubetune.techniques.early_stopping.training:EarlyStopping",
)
