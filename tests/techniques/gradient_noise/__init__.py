"""A 16th technique, kept as a test fixture: Gaussian noise added to the gradients.

The whole technique is this folder: this declaration (spec block, number, title, a rule) and the
trainer plugin in ``training.py``. ``tests/techniques/test_a_new_technique.py`` adds it to the
registry with ``KUBETUNE_TECHNIQUES=tests.techniques.gradient_noise`` and checks that validation,
the CRD, the docs and the trainer all know it — nothing else in the repository names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from pydantic import Field

from kubetune.api.base import SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Capability, Declaration, Requirement

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class GradientNoiseSpec(SpecModel):
    """Gaussian noise added to every gradient before the optimizer step (Neelakantan et al., 2015)."""

    std: float = Field(default=0.01, gt=0.0, le=10.0, description="Standard deviation of the noise added to each gradient.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the noise.")


def _requires(config: GradientNoiseSpec) -> Iterator[Requirement]:
    yield Requirement(Capability.READS_FULL_WEIGHTS, "gradient noise hooks every trainable weight", "std")


def _noise_needs_clipping(spec: FineTuneJobSpec) -> Iterator[Problem]:
    gn = spec.techniques.config("gradientNoise")
    if gn is not None and gn.std > 1.0 and spec.training.max_grad_norm is None:
        yield Problem("spec.techniques.gradientNoise.std", f"noise of std {gn.std} with no gradient clipping drowns the gradients; set training.maxGradNorm")


DECLARATION = Declaration(
    key="gradientNoise",
    number=16,
    title="Gaussian noise added to the gradients",
    spec=GradientNoiseSpec,
    capabilities=frozenset({Capability.READS_FULL_WEIGHTS}),
    requires=_requires,
    rules=(_noise_needs_clipping,),
    trainer="tests.techniques.gradient_noise.training:GradientNoise",
)
