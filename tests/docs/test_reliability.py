"""docs/reliability.md: every test it names exists, and every command it gives points at real files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reliability.md"


def test_every_named_test_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    named = set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text))
    assert len(named) >= 8
    for path, name in sorted(named):
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^\s*(async )?def {name}\(", source, re.M), f"{path}::{name} named in docs/reliability.md does not exist"


def test_every_test_file_of_a_command_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    for path in set(re.findall(r"(tests/[\w/]+\.py)", text)):
        assert (ROOT / path).is_file(), path


def test_the_page_is_linked_from_the_docs_index_and_readme() -> None:
    assert "(reliability.md)" in (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    assert "(docs/reliability.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
