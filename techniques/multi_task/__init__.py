"""Technique 5, multi task: the ``spec.techniques.multiTask`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from kubetune.api.base import SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Declaration

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class MultiTaskSpec(SpecModel):
    """Several datasets/tasks at once."""

    sampling: Literal["proportional", "weights", "temperature", "uniform"] = Field(
        default="weights",
        description="weights: by each dataset's weight; proportional: by size; temperature: size^(1/T); uniform: equal.",
    )
    temperature: float = Field(default=2.0, gt=0.0, le=100.0, description="T for temperature sampling.")
    task_prefixes: bool = Field(default=False, description="Prepend `<task>: ` to every input so the model knows the task.")
    per_task_metrics: bool = Field(default=True, description="Report eval metrics per task in status.")


def _needs_several(spec: FineTuneJobSpec) -> Iterator[Problem]:
    mt = spec.techniques.multi_task
    if mt is None:
        return
    tasks = {d.task or d.name or f"dataset-{i}" for i, d in enumerate(spec.data.datasets)}
    if len(spec.data.datasets) < 2:
        yield Problem("spec.data.datasets", "multi-task learning needs at least two datasets (one per task)")
    elif len(tasks) < 2:
        yield Problem("spec.data.datasets", "multi-task learning needs datasets of at least two different tasks (set each dataset's task or name)")


DECLARATION = Declaration(
    key="multiTask",
    number=5,
    title="Multi-task learning over several datasets",
    spec=MultiTaskSpec,
    rules=(_needs_several,),
    trainer="kubetune.techniques.multi_task.training:MultiTask",
)
