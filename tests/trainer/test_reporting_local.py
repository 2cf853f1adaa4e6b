"""Reporting without a cluster (``kubetune train``): status.json beside the run, a progress bar or
plain lines in the terminal, and progress numbers (percent, ETA) that agree with each other."""

from __future__ import annotations

import io
import json
import math
import pathlib
import threading
from typing import Any

import pytest

from kubetune.api import FineTuneJobStatus, parse_job
from kubetune.trainer.reporting import LocalReporter, TrainerStatus, make_reporter

MANIFEST: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo"},
    "spec": {
        "model": {"source": "hf://org/tiny"},
        "data": {"datasets": [{"name": "d", "source": "data.jsonl", "format": "text"}]},
    },
}


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, as stderr is for a user at a shell."""

    def isatty(self) -> bool:
        return True


@pytest.fixture()
def job() -> Any:
    return parse_job(MANIFEST)


def read_status(run_dir: pathlib.Path) -> tuple[dict[str, Any], FineTuneJobStatus]:
    raw = json.loads((run_dir / "status.json").read_text())
    return raw, FineTuneJobStatus.model_validate(raw)


def test_status_json_follows_the_run_and_parses_as_the_status_model(job: Any, tmp_path: pathlib.Path) -> None:
    run_dir = tmp_path / "run"
    reporter = make_reporter(job, rank=0, local=True, run_dir=run_dir, progress_bar=False, stream=io.StringIO())
    assert isinstance(reporter, LocalReporter)
    assert read_status(run_dir)[1].phase == "Running"

    reporter.progress({"step": 10, "total_steps": 40, "epoch": 0.25, "loss": 2.0, "learning_rate": 5e-5,
                       "tokens_per_second": 800.0, "eta_seconds": 30.0, "eval_loss": None, "metrics": {}})
    raw, status = read_status(run_dir)
    assert raw["progress"]["totalSteps"] == 40 and raw["progress"]["learningRate"] == 5e-5  # camelCase
    assert status.progress.step == 10 and status.progress.percent == 25.0 and status.progress.eta_seconds == 30.0

    reporter.evaluated({"eval_loss": 1.5, "eval_accuracy": 0.8})
    reporter.checkpoint(20, str(tmp_path / "ckpt-20"), {"eval_accuracy": 0.8}, best=True)
    reporter.progress({"step": 40, "total_steps": 40, "loss": 1.2})
    reporter.finished(str(tmp_path / "final"), "completed")
    reporter.close()

    raw, status = read_status(run_dir)
    assert status.phase == "Succeeded" and status.start_time and status.completion_time
    assert status.progress.step == 40 and status.progress.percent == 100.0 and status.progress.eta_seconds == 0.0
    assert status.progress.eval_loss == 1.5 and status.progress.metrics == {"eval_accuracy": 0.8}
    assert status.progress.stop_reason == "completed"
    assert status.latest_checkpoint == status.best_checkpoint == str(tmp_path / "ckpt-20")
    assert status.output_path == str(tmp_path / "final")
    assert raw["latestCheckpoint"] and raw["outputPath"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["status.json"]  # no temp files left behind


def test_a_run_that_raises_leaves_a_failed_status(job: Any, tmp_path: pathlib.Path) -> None:
    with pytest.raises(RuntimeError):
        with make_reporter(job, rank=0, local=True, run_dir=tmp_path, progress_bar=False, stream=io.StringIO()) as r:
            r.progress({"step": 3, "total_steps": 10, "loss": 1.0})
            raise RuntimeError("out of memory")
    status = read_status(tmp_path)[1]
    assert status.phase == "Failed" and status.progress.step == 3 and status.progress.stop_reason is None


def test_status_json_is_replaced_atomically(job: Any, tmp_path: pathlib.Path) -> None:
    reporter = make_reporter(job, rank=0, local=True, run_dir=tmp_path, progress_bar=False, stream=io.StringIO())
    done = threading.Event()
    torn: list[str] = []

    def read_while_writing() -> None:
        while not done.is_set():
            text = (tmp_path / "status.json").read_text()
            try:
                FineTuneJobStatus.model_validate(json.loads(text))
            except ValueError:
                torn.append(text)

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    for step in range(1, 301):
        reporter.progress({"step": step, "total_steps": 300, "loss": 1.0, "metrics": {f"m{i}": i for i in range(20)}})
    done.set()
    reader.join()
    reporter.close()
    assert torn == []


def test_plain_lines_without_a_progress_bar(job: Any, tmp_path: pathlib.Path) -> None:
    out = Terminal()
    with make_reporter(job, rank=0, local=True, run_dir=tmp_path, progress_bar=False, stream=out) as reporter:
        reporter.progress({"step": 5, "total_steps": 50, "epoch": 0.1, "loss": 2.34567, "learning_rate": 1e-4,
                           "eta_seconds": 75})
        reporter.progress({"step": 10, "total_steps": 50, "loss": 2.1})
        reporter.checkpoint(10, "/runs/ckpt-10", None, best=True)
        reporter.finished("/runs/final", "early-stopped: eval_loss did not improve for 2 evaluations")
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 5/50 (10.0%)  epoch 0.10  loss 2.3457  lr 1.00e-04  eta 1m15s"
    assert lines[1].startswith("step 10/50 (20.0%)")
    assert lines[2] == "checkpoint at step 10: /runs/ckpt-10 (best so far)"
    assert lines[3] == ("training ended (early-stopped: eval_loss did not improve for 2 evaluations); "
                        "output in /runs/final")
    assert "\r" not in out.getvalue()


def test_progress_bar_on_a_terminal(job: Any, tmp_path: pathlib.Path) -> None:
    pytest.importorskip("tqdm")
    out = Terminal()
    with make_reporter(job, rank=0, local=True, run_dir=tmp_path, progress_bar=True, stream=out) as reporter:
        for step in range(1, 21):
            reporter.progress({"step": step, "total_steps": 20, "loss": 1.0 / step})
        reporter.checkpoint(20, "/runs/ckpt-20", None)
        reporter.finished(None, "completed")
    text = out.getvalue()
    assert "\r" in text and "20/20" in text and "loss=0.05" in text  # a tqdm bar, redrawn in place
    assert "step 20/20" not in text  # not the plain lines
    assert "checkpoint at step 20: /runs/ckpt-20" in text and "training ended (completed)" in text


def test_no_bar_when_the_output_is_not_a_terminal(job: Any, tmp_path: pathlib.Path) -> None:
    out = io.StringIO()  # e.g. redirected to a file: plain lines, no carriage returns
    with make_reporter(job, rank=0, local=True, run_dir=tmp_path, progress_bar=True, stream=out) as reporter:
        reporter.progress({"step": 1, "total_steps": 2, "loss": 1.0})
    assert out.getvalue().startswith("step 1/2 (50.0%)") and "\r" not in out.getvalue()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percent_follows_steps_and_eta_follows_the_measured_rate() -> None:
    clock = FakeClock()
    status = TrainerStatus(clock=clock)
    status.record_progress({"step": 100, "total_steps": 1000, "percent": 55.0})  # a wrong percent is corrected
    assert status.progress.percent == 10.0 and status.progress.eta_seconds is None  # no rate measured yet
    clock.now += 20.0
    status.record_progress({"step": 200})  # total_steps is remembered
    assert status.progress.percent == 20.0
    assert status.progress.eta_seconds == pytest.approx(20.0 / 100 * 800)  # 0.2 s/step, 800 steps left
    status.record_progress({"step": 300, "eta_seconds": 99.0})  # the loop's own ETA wins
    assert status.progress.eta_seconds == 99.0
    status.record_progress({"step": 1200})  # past the plan: capped, nothing left
    assert status.progress.percent == 100.0 and status.progress.eta_seconds == 0.0


def test_values_json_cannot_carry_are_dropped_not_fatal() -> None:
    status = TrainerStatus()
    status.record_progress({"step": 1, "loss": 2.0, "learning_rate": 1e-3})
    status.record_progress({"step": 2, "loss": math.nan, "learning_rate": math.inf, "metrics": {"f1": math.nan, "acc": 0.5}})
    progress = status.progress
    assert progress.step == 2 and progress.loss == 2.0 and progress.learning_rate == 1e-3  # last finite values
    assert progress.metrics == {"acc": 0.5}
    body = json.dumps(status.patch_body()[1], allow_nan=False)  # valid JSON for the API server
    assert '"step": 2' in body


def test_percent_without_a_plan_is_clamped() -> None:
    status = TrainerStatus()
    status.record_progress({"step": 5, "percent": 130.0})
    assert status.progress.percent == 100.0 and status.progress.total_steps is None


def test_metrics_no_longer_reported_are_removed_by_the_merge_patch() -> None:
    status = TrainerStatus()
    status.record_evaluation({"eval_loss": 1.0, "task_a": 0.5, "task_b": 0.6})
    assert status.patch_body()[1]["status"]["progress"]["metrics"] == {"task_a": 0.5, "task_b": 0.6}
    status.record_progress({"step": 3, "metrics": {}})  # no new evaluation: the last metrics stay
    assert status.patch_body()[1]["status"]["progress"]["metrics"] == {"task_a": 0.5, "task_b": 0.6}
    status.record_evaluation({"eval_loss": 0.9, "task_a": 0.7})
    body = status.patch_body()[1]["status"]["progress"]
    assert body["metrics"] == {"task_a": 0.7, "task_b": None}  # null removes task_b from the object
    assert body["evalLoss"] == 0.9
    assert status.status().progress.metrics == {"task_a": 0.7}


def test_progress_line_shows_eval_loss_once() -> None:
    from kubetune.api.statuses import Progress
    from kubetune.trainer.reporting import describe_progress

    line = describe_progress(Progress(step=5, total_steps=10, loss=0.5, eval_loss=0.4, metrics={"eval_loss": 0.4, "eval_accuracy": 0.9}))
    assert line.count("eval_loss") == 1 and "eval_accuracy 0.9" in line


def test_step_lines_mark_eval_metrics_from_an_earlier_step(job: Any, tmp_path: pathlib.Path) -> None:
    """The loop repeats the latest eval metrics on every line; only the eval's own step shows them
    unmarked, later lines say which step they are from."""
    out = io.StringIO()
    metrics = {"eval_loss": 0.75, "eval_accuracy": 0.5}
    with make_reporter(job, rank=0, local=True, run_dir=tmp_path, progress_bar=False, stream=out) as reporter:
        reporter.progress({"step": 10, "total_steps": 30, "loss": 1.0, "eval_loss": 0.75, "metrics": metrics,
                           "eval_step": 10})
        reporter.progress({"step": 20, "total_steps": 30, "loss": 0.9, "eval_loss": 0.75, "metrics": metrics,
                           "eval_step": 10})
    fresh, stale = out.getvalue().splitlines()[:2]
    assert "eval_loss 0.7500" in fresh and "eval@" not in fresh, fresh
    assert stale.startswith("step 20/30") and "eval@10: eval_loss 0.7500" in stale, stale
    assert stale.count("eval_loss") == 1 and "eval_accuracy 0.5" in stale
