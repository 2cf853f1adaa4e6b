"""The README's first command: ``kubetune train -f examples/quickstart.yaml`` from a fresh clone."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.trainer.conftest import REPO, trainer_env


@pytest.mark.slow
def test_quickstart_trains_minilm_and_accuracy_improves(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "train", "-f", str(REPO / "examples" / "quickstart.yaml"), "--no-progress"],
        # No HF_HUB_OFFLINE: a user's shell does not set it, and the trainer needs no network for pkg://.
        cwd=tmp_path, env={k: v for k, v in trainer_env().items() if k != "HF_HUB_OFFLINE"},
        capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    before = float(re.search(r"eval before training: .*eval_accuracy ([\d.]+)", out).group(1))
    after = float(re.search(r"eval after training: .*eval_accuracy ([\d.]+)", out).group(1))
    assert before < 0.7 and after >= 0.9, (before, after)
    output = tmp_path / "runs" / "quickstart" / "output"  # the default run folder, under the cwd
    assert (output / "model.safetensors").exists() and (output / "README.md").exists()
