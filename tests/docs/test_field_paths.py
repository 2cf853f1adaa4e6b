"""Every FineTuneJob field and chart value the prose names exists.

The README, docs/, the chart README, bench/README.md and the examples' comments name fields as
``spec.training.maxSteps``, ``training.packing`` or ``continualLearning.fromCheckpoint``. A path
that starts with a spec block or a technique must be a field of the CRD's schema (what the API
server accepts), so a renamed or removed field cannot linger in the docs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.crds import build_crd

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "charts" / "kubetune" / "README.md", ROOT / "bench" / "README.md",
         *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.yaml"))]
FILE_SUFFIXES = {"md", "py", "yaml", "yml", "json", "jsonl", "txt", "csv", "lua", "sh"}
PATH = re.compile(r"(?<![\w./-])(?:spec\.)?([a-z][A-Za-z0-9]*(?:(?:\[\d*\])?\.[a-z][A-Za-z0-9]*)+)")


def _paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, child in node.get("properties", {}).items():
        yield f"{prefix}{key}"
        yield from _paths(child, f"{prefix}{key}.")
        yield from _paths(child.get("items", {}), f"{prefix}{key}.")


SPEC = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
FIELDS = set(_paths(SPEC))
BLOCKS = set(SPEC["properties"])
TECHNIQUES = set(SPEC["properties"]["techniques"]["properties"])


def unknown_fields(text: str) -> set[str]:
    """Field paths in ``text`` (code spans and plain prose) that start like a spec path but are no field."""
    found = set()
    for match in PATH.finditer(text):
        path = re.sub(r"\[\d*\]", "", match.group(1))
        if path.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue  # a file name (task.yaml), not a field
        head = path.split(".")[0]
        if head in TECHNIQUES and head not in BLOCKS:
            path = f"techniques.{path}"
        elif head not in BLOCKS:
            continue
        # a trailing word that is no field may be prose ("training.maxSteps.") — only whole paths count
        if path not in FIELDS:
            found.add(match.group(0))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_field_path_named_is_a_field(page: Path) -> None:
    assert unknown_fields(page.read_text(encoding="utf-8")) == set()


def test_the_check_finds_a_field_that_is_not_there() -> None:
    assert unknown_fields("set `training.microBatchSize` and spec.resources.gpusPerNode") == set()
    assert unknown_fields("set `training.microBatch` or continualLearning.fromCheckpointt") == {
        "training.microBatch", "continualLearning.fromCheckpointt"}


# --- the chart's values ---------------------------------------------------------------------------

VALUES = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text(encoding="utf-8"))
VALUE_PAGES = [ROOT / "README.md", ROOT / "charts" / "kubetune" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def unknown_values(text: str) -> set[str]:
    """Dotted names in ``text`` that start with a top-level key of values.yaml but are no value
    (a key inside a free-form map, e.g. ``metrics.serviceMonitor.labels.release``, counts)."""
    found = set()
    for match in PATH.finditer(text):
        parts = match.group(1).split(".")
        if parts[0] not in VALUES or parts[-1] in FILE_SUFFIXES:
            continue
        node: Any = VALUES
        for part in parts:
            if isinstance(node, dict) and not node and node is not VALUES:
                break  # a free-form map: any key
            if not isinstance(node, dict) or part not in node:
                found.add(match.group(0))
                break
            node = node[part]
    return found


@pytest.mark.parametrize("page", VALUE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_chart_value_named_is_a_value(page: Path) -> None:
    assert unknown_values(page.read_text(encoding="utf-8")) == set()


def test_the_values_check_finds_a_value_that_is_not_there() -> None:
    assert unknown_values("`metrics.serviceMonitor.labels.release=prom` and `operator.logLevel`") == set()
    assert unknown_values("`metrics.servicemonitor.enabled` or `operator.loglevel`") == {
        "metrics.servicemonitor.enabled", "operator.loglevel"}
