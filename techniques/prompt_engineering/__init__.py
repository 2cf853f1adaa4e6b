"""Technique 4, prompt engineering: the ``spec.techniques.promptEngineering`` block, its rules and what it
needs of the data path (the trainer plugin is ``training.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.base import SpecModel
from kubetune.techniques.declarations import Declaration


class PromptEngineeringSpec(SpecModel):
    """Prompt templates applied to every example (prompt/prefix/p-tuning are peft methods)."""

    template: str | None = Field(
        default=None,
        max_length=16384,
        description="Template rendering each example's prompt; row fields are variables, e.g. `Review: {{ text }}\\nSentiment:`.",
    )
    template_format: Literal["jinja", "format"] = Field(
        default="jinja", description="jinja (`{{ field }}`) or Python format strings (`{field}`)."
    )
    response_template: str | None = Field(
        default=None, max_length=16384, description="Template rendering the target side from the row's fields: the response of instruction rows, the target of seq2seq rows (other formats have no text target)."
    )


DECLARATION = Declaration(
    key="promptEngineering",
    number=4,
    title="Prompt templates (prompt/prefix/p-tuning under peft)",
    spec=PromptEngineeringSpec,
    trainer="kubetune.techniques.prompt_engineering.training:PromptEngineering",
)
