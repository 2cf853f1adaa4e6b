"""A 16th technique is one folder: added to the registry, every layer knows it.

``tests/techniques/gradient_noise/`` is the whole technique (its declaration and its trainer
plugin); it joins the registry through ``KUBETUNE_TECHNIQUES``, in fresh processes — the API builds
``spec.techniques`` when it is first imported. Then validation refuses a bad value with its field
path, runs its rule and its declared capability, the CRD carries its block with descriptions (what
``kubectl explain`` shows), the docs table lists it, and the trainer runs its hook. Without the
variable nothing knows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The fixture imports as tests.techniques.gradient_noise from the repository root (the working directory;
# never PYTHONPATH, which would let the operator/ folder shadow the standard library's operator).
ENV = {**os.environ, "KUBETUNE_TECHNIQUES": "tests.techniques.gradient_noise", "OMP_NUM_THREADS": "1"}


def _manifest(path: Path, block: dict, **spec: object) -> Path:
    body = {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "t.jsonl", "format": "text"}]},
            "techniques": {"gradientNoise": block}, **spec}
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "gn"}, "spec": body}))
    return path


def _kubetune(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetune", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_validation_knows_the_new_block_its_bounds_rule_and_capability(tmp_path: Path) -> None:
    good = _kubetune("validate", "--no-data-check", str(_manifest(tmp_path / "good.yaml", {"std": 0.05})))
    assert good.returncode == 0, good.stderr
    bad = _kubetune("validate", "--no-data-check", str(_manifest(tmp_path / "bad.yaml", {"std": -1})))
    assert bad.returncode == 1 and "spec.techniques.gradientNoise.std: must be > 0.0 (got -1)" in bad.stdout + bad.stderr
    ruled = _kubetune("validate", "--no-data-check", str(_manifest(tmp_path / "rule.yaml", {"std": 2.0}, training={"maxGradNorm": None})))
    assert "spec.techniques.gradientNoise.std: noise of std 2.0 with no gradient clipping" in ruled.stdout + ruled.stderr
    zero3 = _kubetune("validate", "--no-data-check", str(_manifest(tmp_path / "z3.yaml", {}, deepspeed={"zeroStage": 3})))
    assert "spec.techniques.gradientNoise.std: gradient noise hooks every trainable weight, which ZeRO-3 shards" in zero3.stdout + zero3.stderr
    # Without the registry entry the block is unknown: nothing else in the repository names it.
    unknown = _kubetune("validate", "--no-data-check", str(tmp_path / "good.yaml"), env={**ENV, "KUBETUNE_TECHNIQUES": ""})
    assert unknown.returncode == 1 and "spec.techniques.gradientNoise: unknown field" in unknown.stdout + unknown.stderr


def test_the_crd_and_the_docs_carry_the_new_block() -> None:
    crd = yaml.safe_load(_kubetune("crd").stdout)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["techniques"]["properties"]
    block = schema["gradientNoise"]  # what `kubectl explain finetunejob.spec.techniques.gradientNoise` shows
    assert block["description"] == "16 · Gaussian noise added to the gradients."
    assert block["properties"]["std"]["description"] == "Standard deviation of the noise added to each gradient."
    assert block["properties"]["std"]["exclusiveMinimum"] is True
    code = "from kubetune import documenting; print(documenting.techniques_page())"
    page = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, check=True).stdout
    assert "| 16 | [Gaussian noise added to the gradients](#16--gaussian-noise-added-to-the-gradients) | `techniques.gradientNoise` |" in page
    assert "## 16 · Gaussian noise added to the gradients" in page and "| `std` |" in page


@pytest.mark.slow
def test_the_trainer_runs_the_new_plugin(tiny_models, tmp_path: Path) -> None:
    code = f"""
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from tests.techniques.conftest import manifest, train
from tests.techniques.reviews import review_files
doc = manifest({str(tiny_models['encoder'])!r}, [], data=review_files(__import__('pathlib').Path({str(tmp_path)!r})),
               techniques={{"task": {{"type": "classification", "labels": ["negative", "positive"]}}, "gradientNoise": {{"std": 0.5}}}},
               training={{"maxSteps": 2}})
t = train(doc, __import__('pathlib').Path({str(tmp_path)!r}))
print(json.dumps({{"names": [x.name for x in t.techniques], "lines": t.technique_lines}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["names"] == ["task", "gradientNoise"]
    (line,) = [x for x in result["lines"] if x.startswith("  gradientNoise: ")]
    noised = int(line.split(" added to ")[1].split()[0])
    assert noised > 0, line  # its gradient hook ran
    assert "techniques:" in out.stderr and line in out.stderr  # printed under the header, in the run's log
