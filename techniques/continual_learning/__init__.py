"""Technique 14, continual learning: the ``spec.techniques.continualLearning`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from kubetune.api.base import Fraction, SpecModel
from kubetune.techniques.declarations import Capability, Declaration, Requirement


class ReplaySpec(SpecModel):
    """Replay of earlier data."""

    source: str = Field(min_length=1, max_length=1024, description="Dataset of the earlier task (same schemes as data sources).")
    format: Literal["text", "instruction", "chat", "classification", "token-classification", "seq2seq", "question-answering"] | None = Field(
        default=None, description="Format of the replay data; default the first dataset's."
    )
    ratio: Fraction = Field(default=0.2, description="Fraction of examples drawn from replay data.")


class EwcSpec(SpecModel):
    """Elastic weight consolidation towards the starting weights."""

    lambda_: float = Field(default=100.0, gt=0.0, le=1e9, alias="lambda", description="Strength of the EWC penalty.")
    fisher_samples: int = Field(default=64, ge=1, le=100000, description="Examples of the earlier data used to estimate the Fisher information.")


class ContinualLearningSpec(SpecModel):
    """Continue from an earlier job's checkpoint on new data, without forgetting the old."""

    from_checkpoint: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Checkpoint or output of an earlier job (path, pvc://claim/path); default model.source.",
    )
    replay: ReplaySpec | None = Field(default=None, description="Mix in data of the earlier task.")
    ewc: EwcSpec | None = Field(default=None, description="Penalise moving weights that mattered for the earlier task.")


def _requires(config: ContinualLearningSpec) -> Iterator[Requirement]:
    if config.ewc is not None:
        yield Requirement(Capability.READS_FULL_WEIGHTS, "EWC compares every trainable weight with its start", "ewc")


DECLARATION = Declaration(
    key="continualLearning",
    number=14,
    title="Continue from an earlier checkpoint; replay, EWC",
    spec=ContinualLearningSpec,
    capabilities=frozenset({Capability.READS_FULL_WEIGHTS}),
    requires=_requires,
    trainer="kubetune.techniques.continual_learning.training:ContinualLearning",
)
