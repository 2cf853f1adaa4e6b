"""The operator's layers point one way: only the gateway talks to Kubernetes, builders do no I/O,
and nothing in the operator pulls in the trainer's heavy dependencies (the image has no torch)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import kubetune.operator

OPERATOR = pathlib.Path(kubetune.operator.__file__).parent


def imports(path: pathlib.Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_gateway_imports_a_kubernetes_client() -> None:
    talking = {p.name for p in OPERATOR.glob("*.py")
               if any(m == "kubernetes" or m.startswith(("kubernetes.", "aiohttp")) for m in imports(p))}
    assert talking == {"kubeapi.py"}
    # and the gateway's client is aiohttp: the official client only through kopf.login_via_client's fallback
    assert not {m for m in imports(OPERATOR / "kubeapi.py") if m == "kubernetes" or m.startswith("kubernetes.")}


def test_builders_and_phases_are_pure() -> None:
    for name in ("building.py", "phases.py", "naming.py"):
        used = imports(OPERATOR / name)
        assert not {m for m in used if m.startswith(("kopf", "kubetune.operator.kubeapi", "kubernetes"))}, name


def test_the_operator_runs_without_the_trainer_stack() -> None:
    code = ("import sys; import kubetune.operator.handlers, kubetune.operator.rendering; "
            "heavy = {'torch', 'transformers', 'deepspeed', 'peft', 'datasets'} & set(sys.modules); "
            "print(sorted(heavy)); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr



def test_the_operator_imports_no_kubernetes_client() -> None:
    """Loaded as ``kubetune operator`` loads it, the operator holds no Kubernetes client library
    (``test_gateway.py`` checks the running process, logged in and making objects)."""
    code = ("import sys; from kubetune.cli import main, cmd_operator; from kubetune.operator import loading\n"
            "with loading.without_client_libraries(): import kubetune.operator.running\n"
            "import kopf; kopf.set_default_registry(kopf.OperatorRegistry()); import kubetune.operator.handlers\n"
            "found = sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kubernetes_asyncio', 'pykube', 'urllib3'))\n"
            "print(found); sys.exit(1 if found else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
