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


def test_optuna_loads_only_when_a_search_proposes_a_trial() -> None:
    """The operator imports its search module and validates searches without optuna (clusters
    without searches never load it); the first proposal loads it."""
    code = (
        "import sys, json\n"
        "import kubetune.operator.handlers, kubetune.operator.searching, kubetune.operator.rendering\n"
        "from kubetune.api import parse_job\n"
        "from kubetune.api.searching import propose_trial, trial_count\n"
        "job = parse_job({'apiVersion': 'kubetune.io/v1alpha1', 'kind': 'FineTuneJob', 'metadata': {'name': 's'}, 'spec': {\n"
        "    'model': {'source': 'hf://o/m'}, 'data': {'datasets': [{'source': 'd.jsonl', 'format': 'text'}], 'eval': {'holdoutFraction': 0.1}},\n"
        "    'techniques': {'hyperparameterSearch': {'sampler': 'grid', 'parameters': [\n"
        "        {'path': 'training.learningRate', 'type': 'float', 'values': [0.001, 0.01]}]}}}})\n"
        "search = job.spec.techniques.hyperparameter_search\n"
        "before = 'optuna' in sys.modules\n"
        "n = trial_count(search)\n"
        "counted = 'optuna' in sys.modules\n"
        "propose_trial(search, 0, [], 0)\n"
        "print(json.dumps([before, counted, n, 'optuna' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [False, False, 2, True]
