"""Technique 1, domain adaptation: the ``spec.techniques.domainAdaptation`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from pydantic import Field

from kubetune.api.base import ColumnName, Fraction, SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Capability, Declaration, Requirement

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class GeneralDataMix(SpecModel):
    """General-domain text mixed into continued pre-training to limit forgetting."""

    source: str = Field(min_length=1, max_length=1024, description="Dataset of general text (same schemes as data sources).")
    ratio: Fraction = Field(default=0.1, description="Fraction of training examples drawn from the general text.")
    field: ColumnName = Field(default="text", description="Column holding the text.")


class DomainAdaptationSpec(SpecModel):
    """Continued pre-training (causal LM) on a domain corpus."""

    packing: bool = Field(default=True, description="Concatenate documents into full-length blocks (no padding).")
    block_size: int | None = Field(default=None, ge=8, le=1048576, description="Tokens per block; default training.maxSeqLength.")
    general_data: GeneralDataMix | None = Field(default=None, description="Mix in general text to limit forgetting.")


def _requires(config: DomainAdaptationSpec) -> Iterator[Requirement]:
    if config.packing:
        yield Requirement(Capability.PACKS_ITSELF, "domain adaptation already packs documents into full blocks", "packing")


def _causal_lm_on_text(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.techniques.domain_adaptation is None:
        return
    if spec.head != "causal-lm":
        yield Problem("spec.techniques.domainAdaptation", f"continued pre-training trains a causal LM; the {spec.head} head cannot (remove techniques.task or model.head)")
    for i, ds in enumerate(spec.data.datasets):
        if ds.format != "text":
            yield Problem(f"spec.data.datasets[{i}].format", f"domain adaptation reads raw documents: use format 'text', got {ds.format!r}")


DECLARATION = Declaration(
    key="domainAdaptation",
    number=1,
    title="Continued pre-training on a domain corpus",
    spec=DomainAdaptationSpec,
    capabilities=frozenset({Capability.PACKS_ITSELF}),
    requires=_requires,
    rules=(_causal_lm_on_text,),
    trainer="kubetune.techniques.domain_adaptation.training:DomainAdaptation",
)
