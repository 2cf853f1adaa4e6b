"""A model source that is not a model: ``kubetune validate`` and ``kubetune train`` say so with the
field path, and a failed ``kubetune train --restart`` keeps the previous run's output and checkpoints.

Before, a folder of data as spec.model.source passed ``kubetune validate`` and failed in training
with the tokenizer loader's words (sentencepiece, slow tokenizers) instead of the path. No run
trains here: the check comes before the model loads, before any checkpoint is removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.cli import main
from tests.support.tiny_models import manifest, write_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("source, said", [
    ("data", "spec.model.source: {base}/data (from 'data') is not a model folder: it has no config.json"),
    ("data/train.jsonl", "spec.model.source: {base}/data/train.jsonl (from 'data/train.jsonl') is not a model folder: it is a file"),
    ("models/nope", "spec.model.source: {base}/models/nope does not exist (from 'models/nope')"),
], ids=["data folder", "a file", "missing"])
def test_a_model_source_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, said: str) -> None:
    base = tmp_path / "job"
    data = write_dataset(base / "data" / "train.jsonl", "text", n=4)
    job = manifest(source, data, "text")
    (base / "job.yaml").write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000002" / "state.pt").write_bytes(b"weights of step 2")
    (run_dir / "checkpoints" / "latest").write_text("step-00000002")
    (run_dir / "output").mkdir()
    (run_dir / "output" / "model.safetensors").write_bytes(b"the last run's model")
    before = _files(run_dir / "checkpoints") | {f"output/{k}": v for k, v in _files(run_dir / "output").items()}
    expected = said.format(base=base)

    assert main(["validate", "-f", str(base / "job.yaml")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{base / 'job.yaml'}: {expected}"), out

    rc = main(["train", "-f", str(base / "job.yaml"), "-o", str(run_dir), "--restart", "--no-progress", "--nproc", "1"])
    captured = capsys.readouterr()
    assert rc == 2
    assert expected in captured.out + captured.err and "Traceback" not in captured.out + captured.err
    after = _files(run_dir / "checkpoints") | {f"output/{k}": v for k, v in _files(run_dir / "output").items()}
    assert after == before


def test_a_run_directory_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``-o`` naming a file: one line and exit 2, the file untouched (before: a FileExistsError traceback)."""
    base = tmp_path / "job"
    data = write_dataset(base / "data" / "train.jsonl", "text", n=4)
    (base / "job.yaml").write_text(yaml.safe_dump(manifest("model", data, "text")))
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    rc = main(["train", "-f", str(base / "job.yaml"), "-o", str(taken), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and taken.read_text() == "mine"
    assert f"kubetune: run directory {taken} is a file, not a folder; give another with -o" in captured.err
    assert "Traceback" not in captured.out + captured.err
