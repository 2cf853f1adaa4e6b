"""The PEFT block: which parameters learn, full fine-tuning or a parameter-efficient method.

``spec.peft`` is not one of the fifteen techniques (those are ``kubetune.techniques``): every job
has one, and several techniques and rules ask which method it is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kubetune.api.base import Fraction, Pattern, SpecModel

#: Characters that make a targetModules entry a regular expression rather than a module name ('.' alone
#: does not: ``mlp.down_proj`` is a dotted name, matched as a suffix).
REGEX_MARKS = frozenset("*+?^$[]{}()|\\")


def is_module_regex(entry: str) -> bool:
    return any(c in REGEX_MARKS for c in entry)


PeftMethod = Literal["full", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "p-tuning"]
PROMPT_LEARNING_METHODS = frozenset({"prefix", "prompt", "p-tuning"})
ADAPTER_METHODS = frozenset({"lora", "qlora", "dora", "ia3"})


class PeftSpec(SpecModel):
    """Which parameters learn: all of them (full) or a parameter-efficient method through PEFT."""

    method: PeftMethod = Field(
        default="full",
        description=(
            "full fine-tuning, or lora, qlora (4-bit base, GPU only), dora, ia3, prefix (prefix tuning), "
            "prompt (prompt tuning) or p-tuning."
        ),
    )
    r: int = Field(default=16, ge=1, le=4096, description="LoRA/DoRA/QLoRA rank.")
    alpha: float = Field(default=32.0, gt=0.0, le=1e6, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: Fraction = Field(default=0.05, description="Dropout on the LoRA path.")
    target_modules: list[Pattern] | None = Field(
        default=None,
        max_length=256,
        description=(
            "Modules the adapters attach to; default all linear layers of the blocks. An entry is a module name, "
            "matching a module called that or ending in '.<name>' (q_proj, mlp.down_proj), or, when it has any of "
            "* + ? ^ $ [ ] { } ( ) | \\, a regular expression matched against the whole module name "
            "('.*self_attn\\.(q|v)_proj'). Names and expressions may be mixed."
        ),
    )
    layers: list[Annotated[int, Field(ge=0, le=100000)]] | None = Field(
        default=None,
        max_length=1024,
        description="Restrict adapters to these block indices (same as techniques.layerSelection for LoRA).",
    )
    num_virtual_tokens: int = Field(default=20, ge=1, le=4096, description="Virtual tokens for prefix/prompt/p-tuning.")
    init_text: str | None = Field(
        default=None, max_length=4096, description="Initialise prompt-tuning virtual tokens from this text."
    )
    encoder_hidden_size: int | None = Field(default=None, ge=1, le=65536, description="P-tuning prompt encoder width.")
