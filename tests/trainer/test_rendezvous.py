"""Rendezvous fails fast: one process needs no network at all; a process of a multi-process run that
cannot reach ``MASTER_ADDR:MASTER_PORT`` gives up within ``KUBETUNE_RENDEZVOUS_TIMEOUT`` seconds
with one clear line (torch alone retries for 30 minutes, printing C++ stack frames every try)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.trainer.running import EXIT_FAILED
from tests.support.tiny_models import manifest, write_dataset
from tests.trainer.conftest import trainer_env


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nobody listens once the socket is closed


@pytest.mark.slow
def test_a_single_process_ignores_a_stale_master_address(tmp_path: Path) -> None:
    """A shell left with MASTER_ADDR/MASTER_PORT of some other machine (unroutable here) does not
    make a one-process run wait: its process group lives on an in-memory store."""
    code = (
        "import torch\n"
        "from kubetune.trainer.distributing import init_distributed\n"
        "init_distributed(False)\n"
        "t = torch.ones(2); torch.distributed.all_reduce(t)\n"
        "print('world', torch.distributed.get_world_size(), t.tolist())\n"
    )
    # 192.0.2.1: TEST-NET-1 (RFC 5737), reserved for documentation, routed nowhere (no private-range traffic)
    env = trainer_env(MASTER_ADDR="192.0.2.1", MASTER_PORT="29500")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 1 [1.0, 1.0]" in result.stdout
    assert "TCPStore" not in result.stderr and "frame #" not in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_an_unreachable_rendezvous_fails_within_seconds_with_one_line(tmp_path: Path, tiny_model_dir) -> None:
    data = write_dataset(tmp_path / "data.jsonl", "text", n=8)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(manifest(tiny_model_dir("llama"), data, "text")))
    port = _closed_port()
    env = trainer_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      KUBETUNE_RENDEZVOUS_TIMEOUT="3")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(config), "--local-mode", "--no-progress",
         "--base-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt"),
         "--run-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_FAILED, output[-3000:]
    lines = [line for line in output.splitlines() if "rendezvous" in line]
    assert len(lines) == 1, output[-3000:]
    assert f"127.0.0.1:{port}" in lines[0] and "within 3 s" in lines[0] and "KUBETUNE_RENDEZVOUS_TIMEOUT" in lines[0]
    assert "frame #" not in output and "Traceback" not in output and "TCPStore" not in output
    assert elapsed < 60  # imports and the 3 s wait; torch's own default is 30 minutes
