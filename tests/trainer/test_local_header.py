"""`kubetune train` says what it is about to do: its first line names the PEFT method and techniques."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kubetune.api import validate_text

ROOT = Path(__file__).resolve().parents[2]


def test_a_local_run_starts_with_a_header_naming_its_techniques(tmp_path: Path) -> None:
    manifest = ROOT / "examples" / "task-lora-curriculum-augmentation.yaml"
    job = tmp_path / "job.yaml"  # next to no data: the run stops right after its header
    job.write_text(manifest.read_text())
    result = subprocess.run([sys.executable, "-m", "kubetune", "train", "-f", str(job), "-o", str(tmp_path / "run"),
                             "--no-progress", "--nproc", "1"], capture_output=True, text=True, cwd=tmp_path)
    header = result.stdout.splitlines()[0]
    [parsed], problems = validate_text(manifest.read_text(), str(manifest))
    enabled = parsed.spec.techniques.enabled()
    assert problems == [] and len(enabled) >= 2
    assert header.startswith("kubetune: training ") and f"techniques: {', '.join(enabled)}" in header, header
    assert f"peft {parsed.spec.peft.method}" in header
