"""Reporting a training run: progress, checkpoints and the end, to the cluster or the terminal.

The training loop builds one reporter with :func:`make_reporter` and calls it every log interval
(``progress``), after each checkpoint (``checkpoint`` / ``checkpoint_removed``), after each
evaluation (``evaluated``) and at the end (``finished``, then ``close``). Only rank 0 reports;
every other rank gets the base :class:`Reporter`, which does nothing.

In a cluster the reporter keeps the trainer-owned part of the FineTuneJob status
(``status.progress``, ``status.checkpoints``, ``latestCheckpoint``, ``bestCheckpoint``,
``outputPath``; see :mod:`kubetune.api.statuses`) and sends it as a JSON merge patch to the
status subresource from a background thread: progress at most once every
``KUBETUNE_REPORT_INTERVAL`` seconds, checkpoints and the end at once (with the latest progress).
The loop never waits on the API server: an unreachable server is retried with backoff, logged
once when it starts failing and once when it recovers, and ``finished`` gives up after a bounded
flush timeout. ``phase`` and ``conditions`` belong to the operator and are never written.

Locally (``kubetune train``) the reporter draws a progress bar (tqdm) or prints plain lines, and
writes the same status model, camelCase, to ``<run_dir>/status.json`` atomically on each report.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pathlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobStatus
from kubetune.api.statuses import (
    MAX_CHECKPOINTS_IN_STATUS,
    MAX_METRICS,
    CheckpointRecord,
    Progress,
    early_stop_condition,
)

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
MERGE_PATCH = "application/merge-patch+json"

# Backoff between failed patches: first retry after MIN, doubling up to MAX.
RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0

_PROGRESS_NUMBERS = ("epoch", "percent", "loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds")
_PROGRESS_COUNTS = ("step", "total_steps")


def _alias(model: type, field: str) -> str:
    return model.model_fields[field].alias or field


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: Any) -> float | None:
    """A finite float from a Python/NumPy/torch scalar, or None (JSON has no NaN or infinity)."""
    if value is None or isinstance(value, bool):
        return None
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


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


def _bounded_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Finite metrics, by name, at most MAX_METRICS of them (the first ones given)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        number = _number(value)
        if number is None:
            continue
        if len(out) >= MAX_METRICS:
            break
        out[str(key)] = number
    return out


class TrainerStatus:
    """
    The trainer-owned part of a FineTuneJob status, kept bounded and consistent.

    Shared between the training thread (which records) and the patching thread (which reads a
    snapshot), hence the lock. ``version`` counts changes, so a sender knows what it has sent.
    """

    #: FineTuneJobStatus attributes the trainer writes; everything else belongs to the operator.
    OWNED = ("progress", "checkpoints", "latest_checkpoint", "best_checkpoint", "output_path")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.version = 0
        self.progress: Progress | None = None
        self.checkpoints: list[CheckpointRecord] = []
        self.latest_checkpoint: str | None = None
        self.best_checkpoint: str | None = None
        self.output_path: str | None = None
        self.finished = False
        self._rate_origin: tuple[float, int] | None = None  # (clock, step) of the first report
        self._metric_names_sent: set[str] = set()  # so that a merge patch can remove stale ones

    # ------------------------------------------------------------------ recording

    def record_progress(self, values: Mapping[str, Any]) -> Progress:
        with self._lock:
            current = self.progress.model_dump() if self.progress else {}
            for key in _PROGRESS_COUNTS:
                number = _number(values.get(key))
                if number is not None:
                    current[key] = max(0, int(number))
            for key in _PROGRESS_NUMBERS:
                number = _number(values.get(key))
                if number is not None:
                    current[key] = number
            if values.get("metrics"):  # the latest evaluation's full set replaces the previous one
                current["metrics"] = _bounded_metrics(values["metrics"]) or None
            current.setdefault("step", 0)
            self._make_consistent(current, eta_given="eta_seconds" in values and _number(values.get("eta_seconds")) is not None)
            current["updated_at"] = _now()
            self.progress = Progress.model_validate(current)
            self.version += 1
            return self.progress

    def _make_consistent(self, current: dict[str, Any], *, eta_given: bool) -> None:
        """Percent follows step/total; the ETA comes from the loop or from the measured rate."""
        step, total = current["step"], current.get("total_steps")
        now = self._clock()
        if self._rate_origin is None:
            self._rate_origin = (now, step)
        if total:
            current["percent"] = round(100.0 * min(step, total) / total, 2)
            if step >= total:
                current["eta_seconds"] = 0.0
            elif not eta_given:
                origin_time, origin_step = self._rate_origin
                if step > origin_step and now > origin_time:
                    current["eta_seconds"] = round((now - origin_time) / (step - origin_step) * (total - step), 1)
        elif current.get("percent") is not None:
            current["percent"] = min(100.0, max(0.0, current["percent"]))
        if current.get("eta_seconds") is not None:
            current["eta_seconds"] = max(0.0, current["eta_seconds"])

    def record_evaluation(self, metrics: Mapping[str, Any]) -> None:
        values = dict(metrics)
        eval_loss = values.pop("eval_loss", None)
        loss = values.pop("loss", None)
        if eval_loss is None:
            eval_loss = loss
        self.record_progress({"eval_loss": eval_loss, "metrics": values})

    def record_checkpoint(self, step: int, path: str, metrics: Mapping[str, Any] | None, best: bool) -> None:
        record = CheckpointRecord(step=int(step), path=str(path), metrics=_bounded_metrics(metrics) or None, time=_now())
        with self._lock:
            self.checkpoints = [c for c in self.checkpoints if c.path != record.path] + [record]
            self.latest_checkpoint = record.path
            if best:
                self.best_checkpoint = record.path
            self._bound_checkpoints()
            self.version += 1

    def remove_checkpoint(self, path: str) -> None:
        with self._lock:
            self.checkpoints = [c for c in self.checkpoints if c.path != str(path)]
            if self.latest_checkpoint == str(path):
                newest = max(self.checkpoints, key=lambda c: c.step, default=None)
                self.latest_checkpoint = newest.path if newest else None
            if self.best_checkpoint == str(path):
                self.best_checkpoint = None
            self.version += 1

    def record_finish(self, output_path: str | None, reason: str) -> None:
        with self._lock:
            current = self.progress.model_dump() if self.progress else {"step": 0}
            current.update(stop_reason=str(reason), eta_seconds=0.0, updated_at=_now())
            self.progress = Progress.model_validate(current)
            if output_path is not None:
                self.output_path = str(output_path)
            self.finished = True
            self.version += 1

    def adopt(self, existing: Mapping[str, Any] | None) -> None:
        """Take over checkpoints a previous pod of this job listed, so a restart keeps them."""
        if not existing:
            return
        previous = FineTuneJobStatus.model_validate(existing)
        with self._lock:
            known = {c.path for c in self.checkpoints}
            self.checkpoints = sorted([c for c in previous.checkpoints if c.path not in known] + self.checkpoints,
                                      key=lambda c: c.step)
            self.latest_checkpoint = self.latest_checkpoint or previous.latest_checkpoint
            self.best_checkpoint = self.best_checkpoint or previous.best_checkpoint
            self._bound_checkpoints()
            self.version += 1

    def _bound_checkpoints(self) -> None:
        """Newest MAX_CHECKPOINTS_IN_STATUS records; the best stays even when it is old."""
        ordered = sorted(self.checkpoints, key=lambda c: c.step)
        if len(ordered) <= MAX_CHECKPOINTS_IN_STATUS:
            self.checkpoints = ordered
            return
        newest = ordered[-MAX_CHECKPOINTS_IN_STATUS:]
        best = next((c for c in ordered if c.path == self.best_checkpoint), None)
        if best is not None and best not in newest:
            newest = sorted([best] + ordered[-(MAX_CHECKPOINTS_IN_STATUS - 1):], key=lambda c: c.step)
        self.checkpoints = newest

    # ------------------------------------------------------------------ reading

    def status(self) -> FineTuneJobStatus:
        """A copy of the trainer-owned fields as the status model (the rest left unset)."""
        with self._lock:
            return FineTuneJobStatus(
                progress=self.progress.model_copy() if self.progress else None,
                checkpoints=list(self.checkpoints),
                latest_checkpoint=self.latest_checkpoint,
                best_checkpoint=self.best_checkpoint,
                output_path=self.output_path,
            )

    def patch_body(self) -> tuple[int, dict[str, Any]]:
        """``(version, body)``: a JSON merge patch that sets exactly the trainer-owned fields."""
        with self._lock:
            version = self.version
            status = FineTuneJobStatus(
                progress=self.progress, checkpoints=self.checkpoints, latest_checkpoint=self.latest_checkpoint,
                best_checkpoint=self.best_checkpoint, output_path=self.output_path,
            )
            # exclude_none keeps unset fields out; a merge patch would delete them with null.
            body = status.model_dump(mode="json", by_alias=True, include=set(self.OWNED), exclude_none=True)
            for field in ("latest_checkpoint", "best_checkpoint"):
                body.setdefault(_alias(FineTuneJobStatus, field), None)  # a removed one is cleared
            progress_key = _alias(FineTuneJobStatus, "progress")
            metrics_key = _alias(Progress, "metrics")
            if progress_key in body:
                # A merge patch merges maps: metrics no longer reported are removed explicitly.
                # Names ever sent are remembered (a failed patch may have been the one that had
                # them); nulls for names the server never stored are harmless.
                metrics = body[progress_key].get(metrics_key) or {}
                if len(self._metric_names_sent) > 4 * MAX_METRICS:
                    self._metric_names_sent = set()
                self._metric_names_sent |= set(metrics)
                stale = {name: None for name in self._metric_names_sent if name not in metrics}
                if stale:
                    body[progress_key][metrics_key] = {**metrics, **stale}
            return version, {"status": body}


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

    def evaluated(self, metrics: Mapping[str, Any]) -> None:
        """After an evaluation (``eval_loss`` or ``loss`` becomes status.progress.evalLoss)."""

    def finished(self, output_path: str | None, reason: str) -> None:
        """At the end: where the model went and why training stopped."""

    def close(self) -> None:
        """Release the terminal and the background thread; safe to call twice."""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_progress(progress: Progress) -> str:
    """One line for a terminal or a pod log."""
    parts = [f"step {progress.step}" + (f"/{progress.total_steps}" if progress.total_steps else "")]
    if progress.percent is not None:
        parts[0] += f" ({progress.percent:.1f}%)"
    if progress.epoch is not None:
        parts.append(f"epoch {progress.epoch:.2f}")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eval_loss is not None:
        parts.append(f"eval_loss {progress.eval_loss:.4f}")
    shown = [(n, v) for n, v in sorted((progress.metrics or {}).items()) if n != "eval_loss"]
    for name, value in shown[:4]:  # eval_loss is already shown above
        parts.append(f"{name} {value:.4g}")
    if progress.learning_rate is not None:
        parts.append(f"lr {progress.learning_rate:.2e}")
    if progress.tokens_per_second is not None:
        parts.append(f"{progress.tokens_per_second:.0f} tok/s")
    if progress.eta_seconds is not None:
        parts.append(f"eta {_duration(progress.eta_seconds)}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# ---------------------------------------------------------------------- cluster


class StatusClient:
    """The trainer's only line to the Kubernetes API: read and merge-patch one FineTuneJob's status.

    The ``kubernetes`` client is built lazily (in the patching thread), from the pod's service
    account when ``KUBERNETES_SERVICE_HOST`` is set, else from ``KUBECONFIG`` / ~/.kube/config.
    urllib3's own retries are off: the patcher retries, and logs, itself.
    """

    def __init__(self, name: str, namespace: str, *, kubeconfig: str | os.PathLike[str] | None = None) -> None:
        self.name, self.namespace = name, namespace
        self._kubeconfig = kubeconfig
        self._api: Any = None

    def _objects(self) -> Any:
        if self._api is None:
            import kubernetes

            configuration = kubernetes.client.Configuration()
            if self._kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            else:
                # KUBECONFIG is read now, not when the kubernetes package was imported.
                source = self._kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
                kubernetes.config.load_kube_config(config_file=os.path.expanduser(str(source)),
                                                   client_configuration=configuration, persist_config=False)
            configuration.retries = 0
            self._api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))
        return self._api

    def read(self, timeout: float) -> dict[str, Any]:
        obj = self._objects().get_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=_timeouts(timeout))
        return (obj or {}).get("status") or {}

    def patch(self, body: dict[str, Any], timeout: float) -> None:
        self._objects().patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, self.name, body,
            _content_type=MERGE_PATCH, _request_timeout=_timeouts(timeout))

    def close(self) -> None:
        if self._api is not None:
            self._api.api_client.close()


def _timeouts(seconds: float) -> tuple[float, float]:
    seconds = max(0.1, seconds)
    return (min(3.0, seconds), seconds)


def describe_failure(exc: BaseException) -> str:
    """A short, secret-free account of a failed API call (no headers, no request)."""
    status = getattr(exc, "status", None)
    if status is not None and hasattr(exc, "reason"):
        detail = ""
        try:
            detail = json.loads(getattr(exc, "body", None) or "{}").get("message", "")
        except (TypeError, ValueError, AttributeError):
            pass
        return f"HTTP {status} {exc.reason}" + (f": {detail[:200]}" if detail else "")
    cause = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the connection error
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


class StatusPatcher:
    """
    A background thread that sends :class:`TrainerStatus` to the API, throttled, with retries.

    ``poke()`` after a change (``urgent`` skips the throttle, as checkpoints and the end do). The
    thread sends the newest snapshot, so bursts collapse into one patch and the last values win.
    On failure it retries with exponential backoff and logs the outage once, and its end once.
    """

    def __init__(self, status: TrainerStatus, client: StatusClient, *, interval: float,
                 request_timeout: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._status, self._client = status, client
        self._interval, self._request_timeout, self._clock = interval, request_timeout, clock
        self._cond = threading.Condition()
        self._sent_version = 0
        self._last_sent = -math.inf
        self._urgent = False
        self._retry_at = 0.0
        self._failures = 0
        self._deadline: float | None = None  # set when closing: the thread gives up after it
        self._hurry_until = -math.inf  # while flushing or closing, retries come quickly
        self._adopted = False
        self.patches_sent = 0
        self._thread = threading.Thread(target=self._run, name="kubetune-status-patcher", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"FineTuneJob {self._client.namespace}/{self._client.name}"

    def poke(self, *, urgent: bool = False) -> None:
        with self._cond:
            if urgent:
                self._urgent = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Send what is pending now (retrying within ``timeout``); True when it got through."""
        deadline = self._clock() + timeout
        with self._cond:
            target = self._status.version
            self._urgent = True
            self._hurry_until = deadline
            self._retry_at = min(self._retry_at, self._clock())
            self._cond.notify_all()
            while self._sent_version < target and self._thread.is_alive():
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._sent_version >= target

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._deadline = self._hurry_until = self._clock() + timeout
            self._retry_at = min(self._retry_at, self._clock())
            self._cond.notify_all()
        self._thread.join(timeout + 0.5)
        if not self._thread.is_alive():  # else a request is in flight; the daemon thread ends after it
            self._client.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._wait_for_work():
                    return
                urgent, self._urgent = self._urgent, False
            try:
                self._send()
            except Exception as exc:  # noqa: BLE001 - any failure is retried; training must go on
                self._failed(exc, urgent)
            else:
                self._succeeded()

    def _wait_for_work(self) -> bool:
        """Block until a send is due (True) or the patcher is done (False). Holds the lock."""
        while True:
            now = self._clock()
            pending = self._status.version > self._sent_version
            if self._deadline is not None and (not pending or now >= self._deadline):
                return False
            if not pending:
                self._cond.wait()
                continue
            if self._failures:
                due = self._retry_at
            elif self._urgent or self._deadline is not None:
                due = now
            else:
                due = self._last_sent + self._interval
            if self._deadline is not None:
                due = min(due, self._deadline)
            if now >= due:
                return True
            self._cond.wait(due - now)

    def _send(self) -> None:
        timeout = self._request_timeout
        if self._deadline is not None:
            timeout = min(timeout, max(0.1, self._deadline - self._clock()))
        if not self._adopted:
            try:
                self._status.adopt(self._client.read(timeout))
            except Exception as exc:
                if getattr(exc, "status", None) is None:
                    raise  # the server is unreachable: a failure like any other
                logger.debug("not taking over earlier checkpoints of %s: %s", self.target, describe_failure(exc))
            self._adopted = True
        version, body = self._status.patch_body()
        self._client.patch(body, timeout)
        with self._cond:
            self._sent_version = max(self._sent_version, version)
            self._last_sent = self._clock()
            self.patches_sent += 1
            self._cond.notify_all()

    def _failed(self, exc: BaseException, urgent: bool) -> None:
        with self._cond:
            self._failures += 1
            if self._failures == 1:
                logger.warning("cannot report status to %s (%s); training goes on, retrying in the background",
                               self.target, describe_failure(exc))
            else:
                logger.debug("status report to %s failed again: %s", self.target, describe_failure(exc))
            delay = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (self._failures - 1))
            if self._clock() < self._hurry_until:
                delay = min(delay, RETRY_MIN_SECONDS)
            self._retry_at = self._clock() + delay
            self._urgent = self._urgent or urgent

    def _succeeded(self) -> None:
        with self._cond:
            if self._failures:
                logger.warning("status reporting to %s works again (after %d failed attempts)",
                               self.target, self._failures)
            self._failures = 0


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
        logger.info("%s", describe_progress(self.status.record_progress(values)))
        self.patcher.poke()

    def checkpoint(self, step: int, path: str, metrics: Mapping[str, Any] | None = None, best: bool = False) -> None:
        self.status.record_checkpoint(step, path, metrics, best)
        logger.info("checkpoint at step %d: %s%s", step, path, " (best so far)" if best else "")
        self.patcher.poke(urgent=True)

    def checkpoint_removed(self, path: str) -> None:
        self.status.remove_checkpoint(path)
        self.patcher.poke()

    def evaluated(self, metrics: Mapping[str, Any]) -> None:
        self.status.record_evaluation(metrics)
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


# ---------------------------------------------------------------------- local


def write_status_file(path: pathlib.Path, status: FineTuneJobStatus) -> None:
    """Write the status as camelCase JSON, atomically: a reader sees the old file or the new one."""
    text = json.dumps(status.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


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
        self._stream = stream if stream is not None else sys.stderr
        self._phase, self._start_time, self._completion_time = "Running", _now(), None
        self._bar: Any = None
        self._use_bar = progress_bar and _stream_is_terminal(self._stream) and _tqdm() is not None
        self._closed = False
        self._write()

    def progress(self, values: Mapping[str, Any]) -> None:
        progress = self.status.record_progress(values)
        self._show(progress)
        self._write()

    def checkpoint(self, step: int, path: str, metrics: Mapping[str, Any] | None = None, best: bool = False) -> None:
        self.status.record_checkpoint(step, path, metrics, best)
        self._say(f"checkpoint at step {step}: {path}" + (" (best so far)" if best else ""))
        self._write()

    def checkpoint_removed(self, path: str) -> None:
        self.status.remove_checkpoint(path)
        self._write()

    def evaluated(self, metrics: Mapping[str, Any]) -> None:
        self.status.record_evaluation(metrics)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in _bounded_metrics(metrics).items())
        self._say(f"evaluation: {shown}")
        self._write()

    def finished(self, output_path: str | None, reason: str) -> None:
        self.status.record_finish(output_path, reason)
        self._phase, self._completion_time = "Succeeded", _now()
        self._close_bar()
        self._say(f"training ended ({reason})" + (f"; output in {output_path}" if output_path else ""))
        self._write()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_bar()
        if not self.status.finished:
            self._phase, self._completion_time = "Failed", _now()
            self._write()

    def _write(self) -> None:
        status = self.status.status()
        stopped = early_stop_condition(status.progress)  # what the operator shows in a cluster
        if stopped is not None:
            stopped = stopped.model_copy(update={"last_transition_time": self._completion_time or _now()})
        status = status.model_copy(update={
            "phase": self._phase, "start_time": self._start_time, "completion_time": self._completion_time,
            "conditions": [stopped] if stopped is not None else [],
        })
        write_status_file(self.path, status)

    def _show(self, progress: Progress) -> None:
        if not self._use_bar:
            self._say(describe_progress(progress))
            return
        tqdm = _tqdm()
        if self._bar is None:
            self._bar = tqdm(total=progress.total_steps, initial=progress.step, unit="step",
                             file=self._stream, dynamic_ncols=True, leave=True)
        if progress.total_steps and self._bar.total != progress.total_steps:
            self._bar.total = progress.total_steps
        self._bar.n = progress.step
        postfix = {name: f"{value:.4g}" for name, value in (
            ("loss", progress.loss), ("eval_loss", progress.eval_loss), ("lr", progress.learning_rate),
            ("tok/s", progress.tokens_per_second)) if value is not None}
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def _say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self._stream)
        else:
            print(line, file=self._stream, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _stream_is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


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
