"""Technique 3, transfer learning: the ``spec.techniques.transferLearning`` block, its rules and what it
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


class UnfreezeSchedule(SpecModel):
    """Gradual unfreezing from the top."""

    every_steps: int = Field(default=100, ge=1, le=10**9, description="Unfreeze another group of blocks every N steps.")
    blocks_per_stage: int = Field(default=1, ge=1, le=10000, description="Blocks unfrozen at each stage, from the top down.")


class TransferLearningSpec(SpecModel):
    """Transfer learning: a pretrained base, a new head, and how much of the base learns."""

    strategy: Literal["full", "linear-probe", "gradual-unfreeze"] = Field(
        default="full",
        description="full: everything learns; linear-probe: base frozen, only the head learns; gradual-unfreeze: head first, then blocks from the top.",
    )
    new_head: bool = Field(default=True, description="Initialise a new task head (else reuse the checkpoint's head if it has one).")
    head_learning_rate: float | None = Field(default=None, gt=0.0, le=10.0, description="Learning rate for the head (default training.learningRate).")
    base_learning_rate: float | None = Field(default=None, gt=0.0, le=10.0, description="Learning rate for the base (default training.learningRate).")
    unfreeze: UnfreezeSchedule | None = Field(default=None, description="Schedule for gradual-unfreeze.")


def _strategy_needs_full(spec: FineTuneJobSpec) -> Iterator[Problem]:
    tl = spec.techniques.transfer_learning
    if tl is None:
        return
    if tl.strategy != "full" and spec.peft.method != "full":
        yield Problem(
            "spec.techniques.transferLearning.strategy",
            f"{tl.strategy} decides which base weights learn, and peft.method {spec.peft.method!r} already freezes the base; use peft.method full",
        )
    if tl.strategy == "gradual-unfreeze" and tl.unfreeze is None:
        yield Problem("spec.techniques.transferLearning.unfreeze", "gradual-unfreeze needs an unfreeze schedule (everySteps, blocksPerStage)")
    if tl.strategy != "gradual-unfreeze" and tl.unfreeze is not None:
        yield Problem("spec.techniques.transferLearning.unfreeze", "an unfreeze schedule is only used by strategy gradual-unfreeze")
    if tl.strategy != "full" and spec.techniques.layer_selection is not None:
        yield Problem("spec.techniques.layerSelection", f"transferLearning.strategy {tl.strategy} already decides which layers train")


DECLARATION = Declaration(
    key="transferLearning",
    number=3,
    title="Freeze/probe/unfreeze a pretrained base under a new head",
    spec=TransferLearningSpec,
    rules=(_strategy_needs_full,),
    trainer="kubetune.techniques.transfer_learning.training:TransferLearning",
)
