"""Technique 9, controlled generation: the ``spec.techniques.controlledGeneration`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field

from kubetune.api.base import ColumnName, Fraction, SpecModel
from kubetune.techniques.declarations import Capability, Declaration, Requirement


class ControlCodesSpec(SpecModel):
    """Attribute conditioning with control codes."""

    field: ColumnName = Field(default="attribute", description="Column holding each example's attribute value.")
    format: str = Field(default="<{value}>", min_length=1, max_length=256, description="How a value becomes a control code prepended to the input.")
    values: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, max_length=1000, description="Known attribute values (added as special tokens)."
    )


class DpoSpec(SpecModel):
    """Direct preference optimisation on prompt/chosen/rejected data."""

    beta: float = Field(default=0.1, gt=0.0, le=100.0, description="Strength of the KL constraint to the reference model.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid", description="DPO loss variant.")
    label_smoothing: Fraction = Field(default=0.0, description="Conservative DPO label smoothing.")


class ControlledGenerationSpec(SpecModel):
    """Controlled generation: control codes and/or preference optimisation."""

    control_codes: ControlCodesSpec | None = Field(default=None, description="Prepend attribute control codes.")
    dpo: DpoSpec | None = Field(default=None, description="Steer outputs with DPO on preference data.")


def _requires(config: ControlledGenerationSpec) -> Iterator[Requirement]:
    if config.dpo is not None:
        yield Requirement(Capability.NEEDS_SEQUENCES, "DPO compares chosen and rejected sequences one by one", "dpo")
        yield Requirement(Capability.NEEDS_PREFERENCE_DATA, "DPO", "dpo")
        yield Requirement(Capability.PROVIDES_TASK_LOSS, "DPO replaces the task loss by the preference loss", "dpo")


DECLARATION = Declaration(
    key="controlledGeneration",
    number=9,
    title="Control codes and DPO",
    spec=ControlledGenerationSpec,
    capabilities=frozenset({Capability.NEEDS_SEQUENCES, Capability.NEEDS_PREFERENCE_DATA, Capability.PROVIDES_TASK_LOSS}),
    requires=_requires,
    switches={Capability.NEEDS_PREFERENCE_DATA: "dpo"},
    trainer="kubetune.techniques.controlled_generation.training:ControlledGeneration",
)
