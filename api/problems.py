"""A problem found in a manifest: where (a field path) and what would be right.

Every validation layer (pydantic field checks, cross-field rules, the operator's refusal of an
immutable change, the trainer's check of a pattern against the real model) reports in this one
shape, so that users always read ``spec.peft.r: must be >= 1 (got -4)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


#: A key longer than this is shortened in a path: a hostile 100 kB key is not echoed back whole.
MAX_PATH_PART = 100


def format_path(loc: Sequence[str | int]) -> str:
    """('spec', 'data', 'datasets', 0, 'format') -> 'spec.data.datasets[0].format'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            if len(text) > MAX_PATH_PART:
                text = f"{text[:60]}…({len(text)} characters)"
            out += f".{text}" if out else text
    return out or "(root)"


class SpecError(ValueError):
    """A manifest that cannot be used, with every problem found."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
