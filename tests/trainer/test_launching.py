"""Multi-process pods keep the trainer's exit codes through the launcher (torchrun alone exits 1)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.trainer.launching import exit_code
from kubetune.trainer.running import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_TERMINATED
from tests.support.tiny_models import manifest


def test_worker_codes_map_to_the_pod_code() -> None:
    assert exit_code([]) == EXIT_OK
    assert exit_code([EXIT_BAD_INPUT, -signal.SIGTERM]) == EXIT_BAD_INPUT  # one rank saw bad data, the other was stopped
    assert exit_code([EXIT_TERMINATED, EXIT_TERMINATED]) == EXIT_TERMINATED
    assert exit_code([EXIT_TERMINATED, -signal.SIGTERM]) == EXIT_TERMINATED
    assert exit_code([1]) == EXIT_FAILED
    assert exit_code([-signal.SIGKILL]) == EXIT_FAILED


@pytest.mark.slow
def test_bad_data_in_a_two_process_run_exits_with_the_bad_input_code(tmp_path: Path, tiny_model_dir) -> None:
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": bad}\n')
    config = tmp_path / "job.json"
    config.write_text(json.dumps(manifest(tiny_model_dir("llama"), tmp_path / "broken.jsonl", "text")))
    from tests.trainer.conftest import trainer_env

    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer.launching", "--standalone", "--nproc_per_node=2",
         "-m", "kubetune.trainer", "--config", str(config), "--local-mode",
         "--base-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"),
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--run-dir", str(tmp_path)],
        capture_output=True, text=True, env=trainer_env(), timeout=240,
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stdout[-2000:] + result.stderr[-2000:]
    assert "broken.jsonl" in result.stdout + result.stderr
