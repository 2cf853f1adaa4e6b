"""Fixtures of the trainer tests: tiny models built once per session, and running a job.

* ``tiny_model_dir(arch)`` — folder of a 2-layer random-init model + tokenizer (``llama``,
  ``gpt2``, ``bert``, ``t5``), built once per session (see ``tests.support.tiny_models``).
* ``train_job(manifest, run_dir, ...)`` — writes the manifest and runs ``kubetune train`` on it,
  in this process (fast) or as a subprocess (``subprocess=True``, needed for several processes,
  signals and kills); returns a :class:`Run` with the exit code, output and the training log.

Technique tests in other folders can import the same factories from ``tests.support.tiny_models``
and copy these two fixtures (conftest fixtures are folder-scoped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.support.tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    """The result of one ``kubetune train``."""

    rc: int
    run_dir: Path
    output: str = ""

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def log(self) -> list[dict[str, Any]]:
        """The trainer's per-step log (``output/trainer_log.jsonl``), across restarts."""
        path = self.output_dir / "trainer_log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        return json.loads((self.checkpoint_dir / f"step-{step:08d}" / "trainer.json").read_text())

    def steps(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.checkpoint_dir.glob("step-*"))


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", KUBETUNE_REPORT_FLUSH_TIMEOUT="1", PYTHONUNBUFFERED="1")
    # In-process runs of this session leave torchrun-style variables (and a port in use) behind.
    for key in ("KUBECONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("tiny-models")

    def build(arch: str = "llama") -> Path:
        return tiny_model(root / arch, arch)

    return build


@pytest.fixture
def train_job() -> Callable[..., Run]:
    def run(
        manifest: dict[str, Any],
        run_dir: Path,
        *,
        nproc: int = 1,
        max_steps: int | None = None,
        subprocess_: bool = False,
        timeout: float = 300,
    ) -> Run:
        run_dir.mkdir(parents=True, exist_ok=True)
        job_file = run_dir / "job.yaml"
        job_file.write_text(yaml.safe_dump(manifest))
        args = ["train", "-f", str(job_file), "-o", str(run_dir), "--no-progress"]
        if nproc > 1:
            args += ["--nproc", str(nproc)]
        if max_steps is not None:
            args += ["--max-steps", str(max_steps)]
        if nproc > 1 or subprocess_:
            proc = subprocess.run(
                [sys.executable, "-m", "kubetune", *args], cwd=run_dir, env=trainer_env(),
                capture_output=True, text=True, timeout=timeout,
            )
            return Run(proc.returncode, run_dir, proc.stdout + proc.stderr)
        from kubetune.cli import main

        return Run(main(args), run_dir)

    return run
