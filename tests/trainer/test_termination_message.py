"""A failing trainer tells Kubernetes why, in the container's termination message."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.trainer.running import TERMINATION_MESSAGE_LIMIT, write_termination_message


def test_message_is_written_where_kubernetes_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    assert write_termination_message("data/train.jsonl: row 3: invalid JSON")
    assert log.read_text() == "data/train.jsonl: row 3: invalid JSON"


def test_message_is_cut_to_what_kubernetes_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    write_termination_message("é" * 5000)
    assert len(log.read_bytes()) <= TERMINATION_MESSAGE_LIMIT


def test_nothing_is_written_outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_TERMINATION_LOG", raising=False)
    monkeypatch.setattr("kubetune.trainer.running.TERMINATION_LOG", "/nonexistent/termination-log")
    assert not write_termination_message("x")


def test_bad_data_run_writes_the_row_to_the_termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir) -> None:
    from tests.support.tiny_models import manifest

    from kubetune.api import parse_job
    from kubetune.trainer.running import EXIT_BAD_INPUT, RunOptions, RunPaths, run

    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": bad}\n')
    body = manifest(tiny_model_dir("llama"), "broken.jsonl", "text")
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    paths = RunPaths(base_dir=tmp_path, output_dir=tmp_path / "out", checkpoint_dir=tmp_path / "ckpt", run_dir=tmp_path)
    assert run(parse_job(body), paths, RunOptions(local=True, progress=False)) == EXIT_BAD_INPUT
    message = log.read_text()
    assert "broken.jsonl" in message and "row 3" in message and "at at" not in message
