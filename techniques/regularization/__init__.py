"""Technique 11, regularization: the ``spec.techniques.regularization`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from kubetune.api.base import Fraction, Pattern, SpecModel
from kubetune.techniques.declarations import Capability, Declaration, Requirement


class RegularizationSpec(SpecModel):
    """Regularisation terms."""

    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0, description="Decoupled weight decay (AdamW).")
    no_decay_patterns: list[Pattern] = Field(
        default_factory=lambda: ["*bias", "*norm*", "*ln_*", "*LayerNorm*"],
        max_length=64,
        description="Parameters exempt from weight decay.",
    )
    l1: float = Field(default=0.0, ge=0.0, le=10.0, description="L1 penalty on trainable weights.")
    l2_sp: float = Field(default=0.0, ge=0.0, le=1000.0, description="L2-SP penalty: squared distance to the pretrained weights.")
    dropout: Fraction | None = Field(default=None, description="Override the model's dropout probabilities.")
    label_smoothing: Fraction = Field(default=0.0, description="Label smoothing of the cross-entropy.")


def _requires(config: RegularizationSpec) -> Iterator[Requirement]:
    if config.label_smoothing:
        yield Requirement(Capability.NEEDS_LOGITS, "label smoothing needs the logits, and the fused packed loss keeps none", "labelSmoothing")
    if config.l1:
        yield Requirement(Capability.READS_FULL_WEIGHTS, "L1 reads every trainable weight", "l1")
    if config.l2_sp:
        yield Requirement(Capability.READS_FULL_WEIGHTS, "L2-SP compares every trainable weight with its start", "l2Sp")


DECLARATION = Declaration(
    key="regularization",
    number=11,
    title="Weight decay, L1, L2-SP, dropout, label smoothing",
    spec=RegularizationSpec,
    capabilities=frozenset({Capability.NEEDS_LOGITS, Capability.READS_FULL_WEIGHTS}),
    requires=_requires,
    trainer="kubetune.techniques.regularization.training:Regularization",
)
