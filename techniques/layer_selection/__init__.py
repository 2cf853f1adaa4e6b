"""Technique 10, layer selection: the ``spec.techniques.layerSelection`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from kubetune.api.base import Pattern, SpecModel
from kubetune.api.peft import PROMPT_LEARNING_METHODS
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Declaration

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class LayerLearningRate(SpecModel):
    """A learning rate for the parameters matching a pattern."""

    pattern: Pattern = Field(description="Glob over parameter names, e.g. `*.mlp.*`.")
    learning_rate: float = Field(gt=0.0, le=10.0, description="Learning rate for those parameters.")


class LayerSelectionSpec(SpecModel):
    """Train only chosen layers/modules; the rest is frozen."""

    layers: list[Annotated[str, Field(pattern=r"^-?[0-9]+(:(-?[0-9]+)?)?$", max_length=32)]] | None = Field(
        default=None,
        max_length=1024,
        description="Block indices or Python-style ranges: `3`, `8:12` (end exclusive), `-4:` (the last four); negatives count from the end.",
    )
    patterns: list[Pattern] | None = Field(
        default=None, max_length=256, description="Globs over parameter names that stay trainable, e.g. `*.mlp.*`."
    )
    train_head: bool = Field(default=True, description="Keep the task head / LM head trainable.")
    learning_rates: list[LayerLearningRate] | None = Field(default=None, max_length=64, description="Per-group learning rates.")


def _selects_something(spec: FineTuneJobSpec) -> Iterator[Problem]:
    ls = spec.techniques.layer_selection
    if ls is None:
        return
    if not ls.layers and not ls.patterns and not ls.learning_rates:
        yield Problem("spec.techniques.layerSelection", "select layers, patterns or learningRates; an empty selection trains nothing")
    if spec.peft.method in PROMPT_LEARNING_METHODS:
        yield Problem("spec.techniques.layerSelection", f"{spec.peft.method} trains only virtual tokens; layer selection has nothing to select")


DECLARATION = Declaration(
    key="layerSelection",
    number=10,
    title="Train only chosen layers",
    spec=LayerSelectionSpec,
    rules=(_selects_something,),
    trainer="kubetune.techniques.layer_selection.training:LayerSelection",
)
