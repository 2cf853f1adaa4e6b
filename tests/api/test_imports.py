"""The contract stays light: importing kubetune.api pulls in no ML stack and no operator framework."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "deepspeed", "peft", "datasets", "accelerate", "kopf", "kubernetes"]


def test_api_imports_nothing_heavy() -> None:
    code = (
        "import sys, json\n"
        "import kubetune.api, kubetune.api.crds, kubetune.api.validating, kubetune.api.searching\n"
        "from kubetune.api.crds import build_crd; build_crd()\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_cli_validate_imports_nothing_heavy(tmp_path) -> None:
    """`kubetune validate` runs in the operator image, which has no torch."""
    code = (
        "import sys, json, runpy\n"
        "from kubetune.cli import main\n"
        "rc = main(['validate', '-q', 'examples/quickstart.yaml'])\n"
        f"print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [0, []]
