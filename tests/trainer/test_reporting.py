"""Status reporting to a FineTuneJob: patches arrive on the object in the Kubernetes emulator,
throttled, bounded, leaving the operator's fields alone, and never holding up training."""

from __future__ import annotations

import json
import logging
import pathlib
import socket
import time
from typing import Any

import pytest

from kubetune.api import FineTuneJobStatus, parse_job
from kubetune.api.statuses import MAX_CHECKPOINTS_IN_STATUS, MAX_METRICS
from kubetune.trainer.reporting import (
    ENV_JOB_NAME,
    ENV_NAMESPACE,
    ENV_REPORT_INTERVAL,
    ClusterReporter,
    Reporter,
    make_reporter,
)

RESOURCE = "kubetune.io/v1alpha1/finetunejobs"
NAMESPACE = "default"
MANIFEST: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": NAMESPACE},
    "spec": {
        "model": {"source": "hf://org/tiny"},
        "data": {"datasets": [{"name": "d", "source": "data.jsonl", "format": "text"}]},
    },
}
OPERATOR_STATUS = {
    "phase": "Running",
    "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning", "message": "2/2 pods running"}],
    "restarts": 1,
    "observedGeneration": 1,
}


@pytest.fixture()
def job() -> Any:
    return parse_job(MANIFEST)


@pytest.fixture()
def ftj(k8s_emulator: Any, kubeconfig_file: pathlib.Path) -> Any:
    """The FineTuneJob in the emulator, with the status the operator has written so far."""
    k8s_emulator.create_object(RESOURCE, NAMESPACE, MANIFEST)
    k8s_emulator.patch_object(RESOURCE, NAMESPACE, "demo", {"status": OPERATOR_STATUS}, subresource="status")
    return k8s_emulator


def status_of(emulator: Any) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate(emulator.get_object(RESOURCE, NAMESPACE, "demo")["status"])


def status_patches(emulator: Any) -> list[Any]:
    return [r for r in emulator.emulator if str(r.method).upper().endswith("PATCH") and r.subresource == "status"
            and r.name == "demo"]


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def progress_values(step: int, total: int = 1000, **extra: Any) -> dict[str, Any]:
    return {"step": step, "total_steps": total, "epoch": step / 100, "loss": 3.0 - step / 1000,
            "learning_rate": 1e-4, "tokens_per_second": 1500.0, **extra}


def test_only_rank_zero_reports(job: Any, tmp_path: pathlib.Path) -> None:
    reporter = make_reporter(job, rank=1, local=False, run_dir=tmp_path)
    assert type(reporter) is Reporter
    reporter.progress(progress_values(1))
    reporter.finished(None, "completed")
    reporter.close()
    assert not (tmp_path / "status.json").exists()


def test_progress_and_checkpoints_arrive_on_the_finetunejob(ftj: Any, job: Any, tmp_path: pathlib.Path) -> None:
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as reporter:
        reporter.progress(progress_values(100))
        wait_for(lambda: (status_of(ftj).progress or None) is not None)
        progress = status_of(ftj).progress
        assert progress.step == 100 and progress.total_steps == 1000 and progress.percent == 10.0
        assert progress.loss == pytest.approx(2.9) and progress.learning_rate == 1e-4
        assert progress.updated_at

        reporter.evaluated({"eval_loss": 2.5, "accuracy": 0.75}, 100)
        reporter.checkpoint(100, "/ckpt/step-100", {"accuracy": 0.75}, best=True)
        reporter.progress(progress_values(200))
        reporter.checkpoint(200, "/ckpt/step-200", {"accuracy": 0.70})
        reporter.finished("/output/final", "early-stopped: accuracy did not improve for 3 evaluations")

    status = status_of(ftj)
    assert [c.path for c in status.checkpoints] == ["/ckpt/step-100", "/ckpt/step-200"]
    assert status.checkpoints[0].metrics == {"accuracy": 0.75} and status.checkpoints[0].time
    assert status.latest_checkpoint == "/ckpt/step-200"
    assert status.best_checkpoint == "/ckpt/step-100"
    assert status.output_path == "/output/final"
    assert status.progress.step == 200 and status.progress.eval_loss == 2.5
    assert status.progress.eval_step == 100  # the step the metrics belong to (a search's pruner reads them by it)
    assert status.progress.metrics == {"accuracy": 0.75}
    assert status.progress.stop_reason == "early-stopped: accuracy did not improve for 3 evaluations"
    assert status.progress.eta_seconds == 0.0
    for patch in status_patches(ftj):
        assert patch.headers.get("Content-Type", "").startswith("application/merge-patch+json")


def test_operator_fields_survive_every_patch(ftj: Any, job: Any, tmp_path: pathlib.Path) -> None:
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as reporter:
        for step in range(1, 6):
            reporter.progress(progress_values(step * 10))
            reporter.checkpoint(step * 10, f"/ckpt/{step}", None)
        reporter.finished("/out", "completed")

    patches = status_patches(ftj)
    assert patches
    owned = {"progress", "checkpoints", "latestCheckpoint", "bestCheckpoint", "outputPath"}
    for patch in patches:
        assert set(patch.data) == {"status"} and set(patch.data["status"]) <= owned
    raw = ftj.get_object(RESOURCE, NAMESPACE, "demo")["status"]
    for key, value in OPERATOR_STATUS.items():
        assert raw[key] == value


def test_progress_is_throttled_and_the_last_values_win(ftj: Any, job: Any, tmp_path: pathlib.Path) -> None:
    reporter = make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.5)
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < 1.2:  # ~1.2 s of progress calls as fast as they come
        step += 1
        reporter.progress(progress_values(step, total=10**9))
        time.sleep(0.001)
    wait_for(lambda: status_of(ftj).progress is not None and status_of(ftj).progress.step == step)
    patches = len(status_patches(ftj))
    reporter.close()
    assert step > 200
    # one at once, then at most one per 0.5 s: 1 + 1.2/0.5 (+1 for the trailing values)
    assert 2 <= patches <= 4, patches


def test_interval_comes_from_the_environment(ftj: Any, job: Any, tmp_path: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_REPORT_INTERVAL, "60")
    reporter = make_reporter(job, rank=0, local=False, run_dir=tmp_path)
    assert isinstance(reporter, ClusterReporter) and reporter.patcher._interval == 60.0
    for step in range(1, 50):
        reporter.progress(progress_values(step))
    wait_for(lambda: status_of(ftj).progress is not None)
    time.sleep(0.3)
    assert len(status_patches(ftj)) == 1  # the first one; the rest wait for the minute
    reporter.checkpoint(49, "/ckpt/49", None)  # a checkpoint does not wait, and flushes progress
    wait_for(lambda: status_of(ftj).latest_checkpoint == "/ckpt/49")
    assert status_of(ftj).progress.step == 49
    reporter.close()


def test_bad_interval_is_refused_with_the_variable_named(job: Any, tmp_path: pathlib.Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_REPORT_INTERVAL, "soon")
    with pytest.raises(ValueError, match="KUBETUNE_REPORT_INTERVAL: must be a number of seconds >= 0, got 'soon'"):
        make_reporter(job, rank=0, local=False, run_dir=tmp_path)


def test_checkpoint_list_stays_bounded_and_keeps_the_best(ftj: Any, job: Any, tmp_path: pathlib.Path) -> None:
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as reporter:
        reporter.checkpoint(1, "/ckpt/1", {"f1": 0.99}, best=True)
        for step in range(2, 401):
            reporter.checkpoint(step, f"/ckpt/{step}", {"f1": 0.5})
        reporter.finished("/out", "max-steps")

    status = status_of(ftj)
    assert len(status.checkpoints) == MAX_CHECKPOINTS_IN_STATUS
    assert status.checkpoints[0].path == "/ckpt/1" == status.best_checkpoint
    assert [c.step for c in status.checkpoints[1:]] == list(range(400 - MAX_CHECKPOINTS_IN_STATUS + 2, 401))
    assert status.latest_checkpoint == "/ckpt/400"
    assert len(json.dumps(ftj.get_object(RESOURCE, NAMESPACE, "demo")["status"])) < 8000


def test_rotated_checkpoints_leave_the_status(ftj: Any, job: Any, tmp_path: pathlib.Path) -> None:
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as reporter:
        for step in (10, 20, 30):
            reporter.checkpoint(step, f"/ckpt/{step}", None, best=step == 10)
        reporter.checkpoint_removed("/ckpt/10")
        reporter.checkpoint_removed("/ckpt/30")
        reporter.finished(None, "completed")
    status = status_of(ftj)
    assert [c.path for c in status.checkpoints] == ["/ckpt/20"]
    assert status.latest_checkpoint == "/ckpt/20" and status.best_checkpoint is None


def test_metrics_are_bounded_and_replaced(ftj: Any, job: Any, tmp_path: pathlib.Path) -> None:
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as reporter:
        reporter.evaluated({f"task{i}_accuracy": i / 1000 for i in range(3 * MAX_METRICS)})
        reporter.checkpoint(1, "/ckpt/1", {f"m{i}": 1.0 for i in range(3 * MAX_METRICS)})
        assert reporter.patcher.flush(5.0)
        status = status_of(ftj)
        assert len(status.progress.metrics) == MAX_METRICS
        assert len(status.checkpoints[0].metrics) == MAX_METRICS

        reporter.evaluated({"eval_loss": 0.5, "overall_accuracy": 0.9})  # the next evaluation's set
        reporter.finished(None, "completed")
    assert status_of(ftj).progress.metrics == {"overall_accuracy": 0.9}


def test_a_restarted_trainer_keeps_the_checkpoints_of_the_previous_pod(ftj: Any, job: Any,
                                                                       tmp_path: pathlib.Path) -> None:
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as first:
        first.checkpoint(100, "/ckpt/100", {"acc": 0.9}, best=True)
        first.checkpoint(200, "/ckpt/200", None)
        first.finished(None, "preempted")
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as second:
        second.checkpoint(300, "/ckpt/300", None)
        second.finished("/out", "completed")
    status = status_of(ftj)
    assert [c.step for c in status.checkpoints] == [100, 200, 300]
    assert status.best_checkpoint == "/ckpt/100" and status.latest_checkpoint == "/ckpt/300"


def test_name_and_namespace_come_from_the_environment(k8s_emulator: Any, kubeconfig_file: pathlib.Path, job: Any,
                                                      tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k8s_emulator.create_object("v1/namespaces", None, {"metadata": {"name": "team-a"}})
    k8s_emulator.create_object(RESOURCE, "team-a", {**MANIFEST, "metadata": {"name": "renamed", "namespace": "team-a"}})
    monkeypatch.setenv(ENV_JOB_NAME, "renamed")
    monkeypatch.setenv(ENV_NAMESPACE, "team-a")
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0) as reporter:
        reporter.progress(progress_values(7))
        reporter.finished(None, "completed")
    assert k8s_emulator.get_object(RESOURCE, "team-a", "renamed")["status"]["progress"]["step"] == 7


def unreachable_kubeconfig(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    path = tmp_path / "kubeconfig-nowhere.yaml"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "s3cr3t-token-value"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def test_unreachable_api_never_blocks_training(job: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    unreachable_kubeconfig(tmp_path, monkeypatch)
    caplog.set_level(logging.DEBUG, logger="kubetune.trainer")
    reporter = make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0, flush_timeout=1.0)

    started = time.monotonic()
    for step in range(1, 2001):
        reporter.progress(progress_values(step, total=2000))
        if step % 100 == 0:
            reporter.checkpoint(step, f"/ckpt/{step}", {"loss": 1.0})
    burst = time.monotonic() - started

    started = time.monotonic()
    reporter.finished("/out", "completed")
    reporter.close()
    ending = time.monotonic() - started

    assert burst < 1.0, f"2000 progress + 20 checkpoint calls took {burst:.2f}s"
    assert ending < 1.0 + 1.5, f"finished()+close() took {ending:.2f}s with a 1 s flush timeout"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    outage = [r for r in warnings if "cannot report status" in r.getMessage()]
    assert len(outage) == 1, [r.getMessage() for r in warnings]
    assert "retrying in the background" in outage[0].getMessage()
    assert any("did not reach" in r.getMessage() for r in warnings)
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # no warning per failed retry
    assert all("s3cr3t" not in r.getMessage() and "Authorization" not in r.getMessage() for r in caplog.records)


def test_an_outage_is_logged_once_and_the_recovery_once(ftj: Any, job: Any, tmp_path: pathlib.Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import kmock

    caplog.set_level(logging.WARNING, logger="kubetune.trainer")
    # The next 3 status patches fail with 503, as an API server under load would answer.
    ftj.emulator["patch", kmock.resource("kubetune.io", "v1alpha1", "finetunejobs")][:3] << 503 << {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "reason": "ServiceUnavailable",
        "message": "try again"}
    with make_reporter(job, rank=0, local=False, run_dir=tmp_path, interval=0.0, flush_timeout=10.0) as reporter:
        for step in range(1, 30):
            reporter.progress(progress_values(step))
            time.sleep(0.01)
        reporter.finished("/out", "completed")
    assert status_of(ftj).progress.step == 29 and status_of(ftj).output_path == "/out"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot report status" in m for m in messages) == 1, messages
    assert sum("works again" in m for m in messages) == 1, messages
    assert len(messages) == 2, messages  # the 2nd and 3rd failures are not logged as warnings
    assert any("HTTP 503" in m and "try again" in m for m in messages)
