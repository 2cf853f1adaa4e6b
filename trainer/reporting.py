"""Reporting a training run: progress, checkpoints and the end, to the cluster or the terminal.

The training loop builds one reporter with :func:`make_reporter` and calls it every log interval
(``progress``), after each checkpoint (``checkpoint`` / ``checkpoint_removed``), after each
evaluation (``evaluated``) and at the end (``finished``, then ``close``). Only rank 0 reports;
every other rank gets the base :class:`Reporter`, which does nothing.

A reporter only wires three parts together: it accumulates into a
:class:`~kubetune.trainer.progressing.TrainerStatus` (the trainer-owned part of the FineTuneJob
status: ``status.progress``, ``status.checkpoints``, ``latestCheckpoint``, ``bestCheckpoint``,
``outputPath``), publishes it (:mod:`kubetune.trainer.publishing`: a JSON merge patch to the
status subresource from a background thread, progress at most once every
``KUBETUNE_REPORT_INTERVAL`` seconds, checkpoints and the end at once; locally
``<run_dir>/status.json``) and shows it (:mod:`kubetune.trainer.showing`: pod log lines, or a
progress bar / plain lines in the terminal). The loop never waits on the API server, and
``finished`` gives up after a bounded flush timeout. ``phase`` and ``conditions`` belong to the
operator and are never written in a cluster.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import IO, Any

from kubetune.api import FineTuneJob
from kubetune.api.statuses import early_stop_condition
from kubetune.trainer.progressing import TrainerStatus, bounded_metrics, utc_now
from kubetune.trainer.publishing import StatusClient, StatusPatcher, write_status_file
from kubetune.trainer.showing import ProgressDisplay, describe_progress

__all__ = [
    "ENV_FLUSH_TIMEOUT", "ENV_JOB_NAME", "ENV_NAMESPACE", "ENV_REPORT_INTERVAL", "ClusterReporter", "LocalReporter",
    "Reporter", "TrainerStatus", "describe_progress", "job_address", "make_reporter",
]

logger = logging.getLogger(__name__)

#: Name of the FineTuneJob to report to (wins over the manifest's metadata.name).
ENV_JOB_NAME = "KUBETUNE_JOB_NAME"
#: Namespace of that FineTuneJob (wins over metadata.namespace and the pod's service account).
ENV_NAMESPACE = "KUBETUNE_NAMESPACE"
#: Seconds between two progress patches at most (checkpoints and the end are sent at once).
ENV_REPORT_INTERVAL = "KUBETUNE_REPORT_INTERVAL"
#: Seconds ``finished`` may wait for the last status to reach the API server.
ENV_FLUSH_TIMEOUT = "KUBETUNE_REPORT_FLUSH_TIMEOUT"

DEFAULT_REPORT_INTERVAL = 5.0
DEFAULT_FLUSH_TIMEOUT = 10.0
STATUS_FILE = "status.json"
SERVICE_ACCOUNT_NAMESPACE = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _seconds_from_env(name: str, default: float, *, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}: must be a number of seconds >= {minimum:g}, got {raw!r}")
    return value


class Reporter:
    """What the training loop calls. This base does nothing: it is what ranks other than 0 get."""

    def progress(self, values: Mapping[str, Any]) -> None:
        """Every log interval: step, total_steps, epoch, percent, loss, eval_loss, metrics,
        learning_rate, tokens_per_second, eta_seconds. Missing or None keys keep the last value;
        a non-empty ``metrics`` replaces the previous metrics."""

    def checkpoint(self, step: int, path: str, metrics: Mapping[str, Any] | None = None, best: bool = False) -> None:
        """After a checkpoint is written (``best``: it is the best so far by the eval metric)."""

    def checkpoint_removed(self, path: str) -> None:
        """After rotation deleted a checkpoint."""

    def evaluated(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """After an evaluation at optimizer step ``step`` (``eval_loss`` or ``loss`` becomes
        status.progress.evalLoss, ``step`` status.progress.evalStep)."""

    def finished(self, output_path: str | None, reason: str) -> None:
        """At the end: where the model went and why training stopped."""

    def close(self) -> None:
        """Release the terminal and the background thread; safe to call twice."""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClusterReporter(Reporter):
    """Rank 0 in a pod: the status goes to the FineTuneJob's status subresource."""

    def __init__(self, name: str, namespace: str, *, interval: float, flush_timeout: float,
                 kubeconfig: str | os.PathLike[str] | None = None) -> None:
        self.status = TrainerStatus()
        self.flush_timeout = flush_timeout
        self.patcher = StatusPatcher(self.status, StatusClient(name, namespace, kubeconfig=kubeconfig),
                                     interval=interval, request_timeout=min(10.0, max(1.0, flush_timeout)))
        self._closed = False

    def progress(self, values: Mapping[str, Any]) -> None:
        progress = self.status.record_progress(values)
        logger.info("%s", describe_progress(progress, self.status.eval_step))
        self.patcher.poke()

    def checkpoint(self, step: int, path: str, metrics: Mapping[str, Any] | None = None, best: bool = False) -> None:
        self.status.record_checkpoint(step, path, metrics, best)
        logger.info("checkpoint at step %d: %s%s", step, path, " (best so far)" if best else "")
        self.patcher.poke(urgent=True)

    def checkpoint_removed(self, path: str) -> None:
        self.status.remove_checkpoint(path)
        self.patcher.poke()

    def evaluated(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.status.record_evaluation(metrics, step)
        self.patcher.poke()

    def finished(self, output_path: str | None, reason: str) -> None:
        self.status.record_finish(output_path, reason)
        logger.info("training ended (%s)%s", reason, f"; output in {output_path}" if output_path else "")
        if not self.patcher.flush(self.flush_timeout):
            logger.warning("the final status did not reach %s within %gs", self.patcher.target, self.flush_timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.patcher.stop(0.0 if self.status.finished else min(2.0, self.flush_timeout))


class LocalReporter(Reporter):
    """``kubetune train``: a progress bar (or plain lines) and ``<run_dir>/status.json``.

    There is no operator locally, so this reporter also keeps ``phase``, the start and
    completion times and the ``EarlyStopped`` condition in the file: Running while training,
    Succeeded after ``finished``, Failed when closed without it (the run raised).
    """

    def __init__(self, run_dir: pathlib.Path, *, progress_bar: bool = True, stream: IO[str] | None = None) -> None:
        self.status = TrainerStatus()
        self.path = pathlib.Path(run_dir) / STATUS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.display = ProgressDisplay(stream if stream is not None else sys.stderr, progress_bar=progress_bar)
        self._phase, self._start_time, self._completion_time = "Running", utc_now(), None
        self._closed = False
        self._write()

    def progress(self, values: Mapping[str, Any]) -> None:
        progress = self.status.record_progress(values)
        self.display.show(progress, self.status.eval_step)
        self._write()

    def checkpoint(self, step: int, path: str, metrics: Mapping[str, Any] | None = None, best: bool = False) -> None:
        self.status.record_checkpoint(step, path, metrics, best)
        self.display.say(f"checkpoint at step {step}: {path}" + (" (best so far)" if best else ""))
        self._write()

    def checkpoint_removed(self, path: str) -> None:
        self.status.remove_checkpoint(path)
        self._write()

    def evaluated(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.status.record_evaluation(metrics, step)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in bounded_metrics(metrics).items())
        self.display.say(f"evaluation: {shown}")
        self._write()

    def finished(self, output_path: str | None, reason: str) -> None:
        self.status.record_finish(output_path, reason)
        self._phase, self._completion_time = "Succeeded", utc_now()
        self.display.close()
        self.display.say(f"training ended ({reason})" + (f"; output in {output_path}" if output_path else ""))
        self._write()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.display.close()
        if not self.status.finished:
            self._phase, self._completion_time = "Failed", utc_now()
            self._write()

    def _write(self) -> None:
        status = self.status.status()
        stopped = early_stop_condition(status.progress)  # what the operator shows in a cluster
        if stopped is not None:
            stopped = stopped.model_copy(update={"last_transition_time": self._completion_time or utc_now()})
        status = status.model_copy(update={
            "phase": self._phase, "start_time": self._start_time, "completion_time": self._completion_time,
            "conditions": [stopped] if stopped is not None else [],
        })
        write_status_file(self.path, status)


# ---------------------------------------------------------------------- entry point


def job_address(job: FineTuneJob) -> tuple[str, str]:
    """``(name, namespace)`` of the FineTuneJob to report to: the environment wins over the manifest."""
    name = os.environ.get(ENV_JOB_NAME) or job.metadata.name
    namespace = os.environ.get(ENV_NAMESPACE) or job.metadata.namespace
    if not namespace:
        try:
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except OSError:
            namespace = ""
    return name, namespace or "default"


def make_reporter(job: FineTuneJob, rank: int, local: bool, run_dir: pathlib.Path, progress_bar: bool = True,
                  *, interval: float | None = None, flush_timeout: float | None = None,
                  kubeconfig: str | os.PathLike[str] | None = None, stream: IO[str] | None = None) -> Reporter:
    """The reporter for this process: a no-op off rank 0, local or cluster on rank 0.

    ``interval`` (default ``$KUBETUNE_REPORT_INTERVAL`` or 5 s) spaces progress patches;
    ``flush_timeout`` (default ``$KUBETUNE_REPORT_FLUSH_TIMEOUT`` or 10 s) bounds ``finished``;
    ``kubeconfig`` overrides the in-cluster / ``KUBECONFIG`` choice; ``stream`` is the terminal
    (stderr by default) of the local reporter.
    """
    if rank != 0:
        return Reporter()
    if local:
        return LocalReporter(pathlib.Path(run_dir), progress_bar=progress_bar, stream=stream)
    if interval is None:
        interval = _seconds_from_env(ENV_REPORT_INTERVAL, DEFAULT_REPORT_INTERVAL, minimum=0.0)
    if flush_timeout is None:
        flush_timeout = _seconds_from_env(ENV_FLUSH_TIMEOUT, DEFAULT_FLUSH_TIMEOUT, minimum=0.0)
    name, namespace = job_address(job)
    return ClusterReporter(name, namespace, interval=interval, flush_timeout=flush_timeout, kubeconfig=kubeconfig)
