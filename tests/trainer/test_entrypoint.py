"""``python -m kubetune.trainer --config job.json`` as the operator's pods run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.tiny_models import manifest, write_dataset
from tests.trainer.conftest import trainer_env


@pytest.mark.slow
def test_pod_entrypoint_trains_from_the_config_and_environment(tiny_model_dir, tmp_path):
    base = tmp_path / "workspace"
    write_dataset(base / "data" / "train.jsonl", "text", n=24)
    job = manifest(tiny_model_dir("llama"), "data/train.jsonl", "text", name="from-configmap")  # relative: KUBETUNE_BASE_DIR
    config = tmp_path / "job.json"
    config.write_text(json.dumps(job))
    env = trainer_env(
        KUBETUNE_JOB_NAME="from-configmap", KUBETUNE_NAMESPACE="team-a", KUBETUNE_BASE_DIR=str(base),
        KUBETUNE_OUTPUT_DIR=str(tmp_path / "out"), KUBETUNE_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        KUBECONFIG=str(tmp_path / "no-such-kubeconfig"),  # no API server: training must still finish
    )
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "ckpt" / "step-00000004" / "trainer.json").exists()
    assert json.loads((tmp_path / "out" / "kubetune.json").read_text())["metadata"]["name"] == "from-configmap"


def test_invalid_config_exits_2_naming_the_field(tmp_path):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"model": {"source": "m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "nope"}]}}))
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(config)], env=trainer_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "spec.data.datasets[0].format" in proc.stderr
