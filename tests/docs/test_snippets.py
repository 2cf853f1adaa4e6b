"""A FineTuneJob snippet in the docs is one the API accepts.

A ```yaml block of the hand-written pages that holds a whole ``spec`` (model and data) is
validated as `kubetune validate` would (wrapped in apiVersion, kind and a name), so a user who
copies it gets a job that is accepted, not a refusal.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubetune.api import parse_job

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _whole_specs(page: Path) -> list[dict]:
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]
    return [b["spec"] for b in blocks if isinstance(b, dict) and isinstance(b.get("spec"), dict)
            and {"model", "data"} <= set(b["spec"])]


def test_there_is_a_whole_spec_to_check() -> None:
    assert _whole_specs(ROOT / "docs" / "sources.md")


@pytest.mark.parametrize("page", [p for p in PAGES if _whole_specs(p)], ids=lambda p: p.name)
def test_every_whole_spec_snippet_is_accepted(page: Path) -> None:
    for spec in _whole_specs(page):
        parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "snippet"}, "spec": spec})
