"""Technique 15, curriculum: the ``spec.techniques.curriculum`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from kubetune.api.base import ColumnName, Fraction, SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Declaration

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class CurriculumSpec(SpecModel):
    """Curriculum learning: easy examples first, harder ones paced in."""

    difficulty: Literal["length", "score", "loss"] = Field(
        default="length", description="length: tokens; score: a column; loss: the initial model's loss per example."
    )
    score_field: ColumnName | None = Field(default=None, description="Column holding the difficulty score (difficulty: score).")
    pacing: Literal["linear", "step", "root"] = Field(default="linear", description="How the available fraction grows.")
    start_fraction: Fraction = Field(default=0.2, description="Fraction of the data (easiest first) available at step 0.")
    full_at: Fraction = Field(default=0.8, description="Fraction of training after which all data is available.")
    stages: int = Field(default=4, ge=1, le=1000, description="Number of stages for step pacing.")
    reverse: bool = Field(default=False, description="Hard to easy (anti-curriculum).")


def _settings(spec: FineTuneJobSpec) -> Iterator[Problem]:
    cur = spec.techniques.curriculum
    if cur is None:
        return
    if cur.difficulty == "score" and not cur.score_field:
        yield Problem("spec.techniques.curriculum.scoreField", "difficulty 'score' needs the column that holds the score")
    if cur.start_fraction > 1.0 or cur.full_at <= 0.0:
        yield Problem("spec.techniques.curriculum.fullAt", "must be > 0 so that all data becomes available")
    if spec.techniques.multi_task is not None:
        yield Problem(
            "spec.techniques.curriculum",
            f"curriculum pacing and multiTask {spec.techniques.multi_task.sampling} sampling both decide the order of "
            "the examples; choose one (multiTask without curriculum, or one dataset per run with curriculum)",
        )


DECLARATION = Declaration(
    key="curriculum",
    number=15,
    title="Curriculum learning",
    spec=CurriculumSpec,
    rules=(_settings,),
    trainer="kubetune.techniques.curriculum.training:Curriculum",
)
