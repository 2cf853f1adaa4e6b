"""Layers point one way: api <- operator, api <- trainer; the operator never needs the ML stack.

Techniques (``techniques/<name>/``) straddle the layers by design, so the rule is per file: a
declaration (``__init__.py``, and the registry's own modules) is read by the API and the operator,
so it imports neither torch nor the operator nor the trainer; a trainer plugin (``training.py``)
is the trainer's, so it imports no operator.

import-linter cannot see our layout (the folders map onto the kubetune namespace through
package-dir), so this reads every module's imports with ``ast`` — including imports inside
functions, which are how the CLI keeps heavy layers lazy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"api": "kubetune.api", "operator": "kubetune.operator", "trainer": "kubetune.trainer", "kubetune": "kubetune"}
ML = {"torch", "transformers", "deepspeed", "peft", "datasets", "accelerate", "safetensors", "tokenizers", "tensorboard"}

FORBIDDEN = {
    "api": {"kubetune.operator", "kubetune.trainer", "kubetune.cli", "kopf", "kubernetes"} | ML,
    "operator": {"kubetune.trainer"} | ML,
    "trainer": {"kubetune.operator", "kopf"},
    "techniques": {"kubetune.operator", "kubetune.trainer", "kubetune.cli", "kopf", "kubernetes"} | ML,
}
#: Within techniques/: the trainer plugins may use the trainer and the ML stack, never the operator.
PLUGIN_FORBIDDEN = {"kubetune.operator", "kubetune.cli", "kopf", "kubernetes"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rules = PLUGIN_FORBIDDEN if folder == "techniques" and path.name == "training.py" else FORBIDDEN[folder]
        for name in _imports(path):
            for forbidden in rules:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(folder: str) -> None:
    assert _violations(folder) == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import torch\n    from kubetune.trainer import x\n")
    assert _imports(module) == {"torch", "kubetune.trainer"}
