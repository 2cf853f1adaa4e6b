"""Technique 2, task: the ``spec.techniques.task`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kubetune.api.base import SpecModel
from kubetune.techniques.declarations import Declaration


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


DECLARATION = Declaration(
    key="task",
    number=2,
    title="Task-specific fine-tuning (head, loss and metrics)",
    spec=TaskSpec,
    trainer="kubetune.techniques.task.training:Task",
)
