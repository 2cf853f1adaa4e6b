"""Technique 2, task: the ``spec.techniques.task`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from kubetune.api.base import SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Declaration

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class TaskSpec(SpecModel):
    """Task-specific fine-tuning: the task decides the head, the loss and the metrics."""

    type: Literal["classification", "token-classification", "seq2seq", "question-answering", "instruction", "causal-lm"] = Field(
        description="The task; decides the model head (classification and NER heads, encoder-decoder, extractive QA, SFT)."
    )
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        min_length=2,
        max_length=10000,
        description="Label names (classification, token-classification); default: read from the data.",
    )
    loss_on_response_only: bool = Field(
        default=True, description="Instruction SFT: mask prompt tokens out of the loss."
    )
    max_target_length: int | None = Field(default=None, ge=1, le=1048576, description="seq2seq: tokens per target.")


def _labels_distinct(spec: FineTuneJobSpec) -> Iterator[Problem]:
    task = spec.techniques.task
    seen: dict[str, int] = {}
    for i, label in enumerate((task.labels or []) if task is not None else []):
        if label in seen:
            yield Problem(f"spec.techniques.task.labels[{i}]", f"{label!r} is already labels[{seen[label]}]; give each label once")
        seen.setdefault(label, i)


DECLARATION = Declaration(
    key="task",
    number=2,
    title="Task-specific fine-tuning (head, loss and metrics)",
    spec=TaskSpec,
    rules=(_labels_distinct,),
    trainer="kubetune.techniques.task.training:Task",
)
