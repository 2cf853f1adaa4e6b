"""Lint and types as part of the suite (so CI's plain ``.venv/bin/pytest`` checks them).

* ruff with the rules in ``pyproject.toml`` (``[tool.ruff]``: pyflakes and pycodestyle errors and
  warnings) over the whole repository;
* mypy, strict (``[tool.mypy]``), on the contract (``kubetune.api``) and the operator
  (``kubetune.operator``). The folders map onto the ``kubetune`` namespace only through the
  installed package (``[tool.setuptools.package-dir]``), which mypy cannot follow, so the test lays
  out the same namespace with symlinks in a temporary folder and checks it there.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: pathlib.Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_ruff_finds_nothing() -> None:
    result = _run(["ruff", "check", "--no-cache", "."], REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict_on_api_and_operator(tmp_path: pathlib.Path) -> None:
    package = tmp_path / "src" / "kubetune"
    package.mkdir(parents=True)
    for item in (REPO / "kubetune").iterdir():
        if item.suffix == ".py" or item.name == "py.typed":
            (package / item.name).symlink_to(item)
    for folder in ("api", "operator", "trainer", "techniques"):
        (package / folder).symlink_to(REPO / folder, target_is_directory=True)
    result = _run(["mypy", "--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
                   "-p", "kubetune.api", "-p", "kubetune.operator"], tmp_path, env={"MYPYPATH": str(tmp_path / "src")})
    assert result.returncode == 0, result.stdout + result.stderr
