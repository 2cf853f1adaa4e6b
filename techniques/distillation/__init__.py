"""Technique 6, distillation: the ``spec.techniques.distillation`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from kubetune.api.base import Fraction, SpecModel
from kubetune.api.peft import PROMPT_LEARNING_METHODS
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Capability, Declaration, Requirement

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class TeacherSpec(SpecModel):
    """The teacher of knowledge distillation."""

    source: str = Field(min_length=1, max_length=1024, description="Where the teacher model comes from (same schemes as model.source).")
    revision: str | None = Field(default=None, max_length=255, description="Revision of an hf:// teacher.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="Dtype the teacher is loaded in.")


class DistillationSpec(SpecModel):
    """Knowledge distillation: loss = alpha·CE + (1-alpha)·T²·KL(teacher‖student)."""

    teacher: TeacherSpec = Field(description="The teacher model; it must share the student's tokenizer.")
    alpha: Fraction = Field(default=0.5, description="Weight of the hard-label cross-entropy.")
    temperature: float = Field(default=2.0, gt=0.0, le=100.0, description="Softmax temperature T.")


def _requires(config: DistillationSpec) -> Iterator[Requirement]:
    yield Requirement(
        Capability.NEEDS_LOGITS, "distillation compares the student's logits with the teacher's, and the fused packed loss keeps none"
    )
    yield Requirement(Capability.PROVIDES_TASK_LOSS, "distillation weighs the task cross-entropy against the KL term")


def _fits_the_run(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.techniques.distillation is None:
        return
    cg = spec.techniques.controlled_generation
    if cg is not None and cg.dpo is not None:
        yield Problem("spec.techniques.distillation", "distillation and DPO both define the loss; run them as separate jobs")
    if spec.head == "question-answering":
        yield Problem("spec.techniques.distillation", "distillation of extractive QA span logits is not supported; use a causal-lm, classification or token-classification head")
    if spec.peft.method in PROMPT_LEARNING_METHODS:
        yield Problem("spec.techniques.distillation", f"{spec.peft.method} changes sequence lengths; distillation needs aligned logits. Use lora")


DECLARATION = Declaration(
    key="distillation",
    number=6,
    title="Knowledge distillation from a teacher",
    spec=DistillationSpec,
    capabilities=frozenset({Capability.NEEDS_LOGITS, Capability.PROVIDES_TASK_LOSS}),
    requires=_requires,
    rules=(_fits_the_run,),
    trainer="kubetune.techniques.distillation.training:Distillation",
)
