"""Technique 12, augmentation: the ``spec.techniques.augmentation`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from kubetune.api.base import Fraction, Probability, SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Declaration

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class AugmentationOp(SpecModel):
    """An augmentation applied with probability ``p`` per example."""

    p: Probability = Field(default=0.1, description="Probability the augmentation is applied to an example.")
    rate: Fraction = Field(default=0.1, description="Fraction of words/tokens touched when it is applied.")


class SynonymAugmentation(AugmentationOp):
    """Replace words by synonyms from a user file."""

    file: str = Field(min_length=1, max_length=1024, description="File of synonym sets: one set per line, words separated by commas.")


class ParaphraseAugmentation(SpecModel):
    """Re-render the prompt with another template."""

    p: Probability = Field(default=0.1, description="Probability of using a paraphrase template.")
    templates: list[Annotated[str, Field(min_length=1, max_length=16384)]] = Field(
        min_length=1, max_length=64, description="Alternative prompt templates (same variables as the main template)."
    )


class AugmentationSpec(SpecModel):
    """Label-preserving text augmentation, applied on the fly and seeded."""

    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Seed; default training.seed.")
    token_dropout: AugmentationOp | None = Field(default=None, description="Drop input tokens.")
    token_masking: AugmentationOp | None = Field(default=None, description="Replace input tokens by the mask/unk token.")
    random_swap: AugmentationOp | None = Field(default=None, description="Swap neighbouring words.")
    random_delete: AugmentationOp | None = Field(default=None, description="Delete words.")
    synonyms: SynonymAugmentation | None = Field(default=None, description="Synonym replacement from a file.")
    template_paraphrase: ParaphraseAugmentation | None = Field(default=None, description="Alternative prompt templates.")


def _keeps_labels(spec: FineTuneJobSpec) -> Iterator[Problem]:
    aug = spec.techniques.augmentation
    if aug is None:
        return
    ops = [aug.token_dropout, aug.token_masking, aug.random_swap, aug.random_delete, aug.synonyms, aug.template_paraphrase]
    if all(op is None for op in ops):
        yield Problem("spec.techniques.augmentation", "turn on at least one augmentation (tokenDropout, tokenMasking, randomSwap, randomDelete, synonyms, templateParaphrase)")
    if spec.head == "question-answering":
        yield Problem("spec.techniques.augmentation", "edits of the question or context would move the answer span of extractive QA; augmentation cannot be used with the question-answering head")
    cg = spec.techniques.controlled_generation
    if cg is not None and cg.dpo is not None:
        yield Problem("spec.techniques.augmentation", "DPO compares fixed chosen/rejected pairs; augmenting them changes what is preferred. Remove augmentation or dpo")


DECLARATION = Declaration(
    key="augmentation",
    number=12,
    title="Data augmentation",
    spec=AugmentationSpec,
    rules=(_keeps_labels,),
    trainer="kubetune.techniques.augmentation.training:Augmentation",
)
