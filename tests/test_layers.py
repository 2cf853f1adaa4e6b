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
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"api": "kubetune.api", "operator": "kubetune.operator", "trainer": "kubetune.trainer", "kubetune": "kubetune",
          "techniques": "kubetune.techniques"}
ML = {"torch", "transformers", "deepspeed", "peft", "datasets", "accelerate", "safetensors", "tokenizers", "tensorboard", "torchao"}

#: The command-line layer (the ``kubetune`` folder's modules): it may import every other layer, none imports it.
CLI = {"kubetune.cli", "kubetune.following", "kubetune.client", "kubetune.documenting", "kubetune.__main__"}

FORBIDDEN = {
    "api": {"kubetune.operator", "kubetune.trainer", "kopf", "kubernetes"} | CLI | ML,
    # `kubetune render` is operator code driven by the CLI: the operator must not reach the trainer
    # through the CLI either (it once did, for --preview).
    "operator": {"kubetune.trainer"} | CLI | ML,
    "trainer": {"kubetune.operator", "kopf"} | CLI,
    "techniques": {"kubetune.operator", "kubetune.trainer", "kopf", "kubernetes"} | CLI | ML,
}
#: Within techniques/: the trainer plugins may use the trainer and the ML stack, never the operator.
PLUGIN_FORBIDDEN = {"kubetune.operator", "kopf", "kubernetes"} | CLI


def _package(path: Path) -> list[str]:
    """The dotted package a file's relative imports start from (``operator/x.py`` -> kubetune.operator)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return [*LAYERS[parts[0]].split("."), *parts[1:-1]]


def _imports(path: Path, package: list[str] | None = None) -> set[str]:
    """Every module a file imports: at the top or inside functions, absolute or relative, ``from
    kubetune import cli`` as ``kubetune.cli``, and ``importlib.import_module("…")`` with a literal."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if package is not None else _package(path)
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in {"import_module", "__import__"}))):
            found.add(node.args[0].value)
    return found


def _forbidden(rules: set[str], names: set[str]) -> list[str]:
    return sorted(name for name in names for forbidden in rules if name == forbidden or name.startswith(forbidden + "."))


def _violations(folder: str) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / folder).rglob("*.py"))
            for name in _forbidden(PLUGIN_FORBIDDEN if folder == "techniques" and path.name == "training.py" else FORBIDDEN[folder],
                                   _imports(path))]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(folder: str) -> None:
    assert _violations(folder) == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import torch\n    from kubetune.trainer import x\n")
    assert _imports(module) == {"torch", "kubetune.trainer", "kubetune.trainer.x"}


def test_the_checker_sees_every_way_the_operator_could_reach_the_cli_or_the_trainer(tmp_path: Path) -> None:
    """What rendering.py did (a lazy ``from kubetune.cli import preview_lines``) and its variants."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "def preview(job):\n"
        "    from kubetune.cli import preview_lines\n"
        "    from kubetune import following\n"
        "    from ..trainer.techniques import prompt_engineering\n"
        "    import importlib\n"
        "    return importlib.import_module('kubetune.trainer.local')\n"
    )
    found = _forbidden(FORBIDDEN["operator"], _imports(sneaky, package=["kubetune", "operator"]))
    assert found == ["kubetune.cli", "kubetune.cli.preview_lines", "kubetune.following", "kubetune.trainer.local",
                     "kubetune.trainer.techniques", "kubetune.trainer.techniques.prompt_engineering"]


def test_render_and_the_operator_load_nothing_of_the_trainer_or_the_cli() -> None:
    """At run time too: every operator module imported, and ``kubetune render`` (without --preview,
    which shows examples through the trainer's data code) run, load no trainer module; the operator's
    modules load no CLI module."""
    code = (
        "import sys, json, pkgutil, importlib, io, contextlib\n"
        "import kubetune.operator\n"
        "for m in pkgutil.iter_modules(kubetune.operator.__path__): importlib.import_module('kubetune.operator.' + m.name)\n"
        "operator = sorted(m for m in sys.modules if m.startswith(('kubetune.trainer', 'kubetune.cli', 'kubetune.client', 'kubetune.following')))\n"
        "from kubetune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): rc = main(['render', '-f', 'examples/hyperparameter-search.yaml', '-f', 'examples/quickstart.yaml'])\n"
        "print(json.dumps([operator, rc, sorted(m for m in sys.modules if m.startswith('kubetune.trainer'))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [[], 0, []]
