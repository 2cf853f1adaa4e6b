"""Technique 7, adversarial: the ``spec.techniques.adversarial`` block, its rules and what it
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


class AdversarialSpec(SpecModel):
    """Adversarial fine-tuning in embedding space, and NEFTune noise."""

    method: Literal["none", "fgm", "pgd", "freelb"] = Field(default="fgm", description="Perturbation method.")
    epsilon: float = Field(default=1.0, gt=0.0, le=1000.0, description="Radius of the perturbation.")
    step_size: float = Field(default=0.3, gt=0.0, le=1000.0, description="Step size of each PGD/FreeLB ascent step.")
    steps: int = Field(default=3, ge=1, le=100, description="Ascent steps (PGD, FreeLB).")
    norm: Literal["l2", "linf"] = Field(default="l2", description="Norm bounding the perturbation.")
    weight: float = Field(default=1.0, gt=0.0, le=100.0, description="Weight of the adversarial loss term.")
    neftune_alpha: float | None = Field(default=None, gt=0.0, le=100.0, description="NEFTune noise scale on input embeddings during training.")


def _requires(config: AdversarialSpec) -> Iterator[Requirement]:
    if config.method != "none":
        yield Requirement(
            Capability.NEEDS_LOGITS,
            f"adversarial method {config.method} re-runs the model on perturbed embeddings, which packed batches cannot "
            "(NEFTune alone works with packing)",
            "method",
        )


def _does_something(spec: FineTuneJobSpec) -> Iterator[Problem]:
    adv = spec.techniques.adversarial
    if adv is not None and adv.method == "none" and adv.neftune_alpha is None:
        yield Problem("spec.techniques.adversarial.method", "method none with no neftuneAlpha changes nothing; choose fgm, pgd or freelb, or set neftuneAlpha")


DECLARATION = Declaration(
    key="adversarial",
    number=7,
    title="Adversarial training (FGM, PGD, FreeLB) and NEFTune",
    spec=AdversarialSpec,
    capabilities=frozenset({Capability.NEEDS_LOGITS}),
    requires=_requires,
    rules=(_does_something,),
    trainer="kubetune.techniques.adversarial.training:Adversarial",
)
