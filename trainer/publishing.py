"""Publishing a run's status: to the FineTuneJob's status subresource, or to ``status.json``.

In a cluster, :class:`StatusPatcher` sends :class:`~kubetune.trainer.progressing.TrainerStatus`
as a JSON merge patch from a background thread, so the training loop never waits on the API
server: progress at most once per interval, checkpoints and the end at once, bursts collapsed into
one patch of the newest snapshot. Failed patches are retried by tenacity with exponential backoff
(quick retries while a flush or the close waits), the outage logged once when it starts and once
when it ends. :class:`StatusClient` is the trainer's only line to the Kubernetes API. Locally,
:func:`write_status_file` writes the same status model to a file, atomically.

The throttle and the wake-ups stay our own code (a condition variable): tenacity retries one
send, it has no notion of "a newer snapshot is waiting" or "send now, the run is ending".
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import tenacity

from kubetune.api import GROUP, PLURAL, VERSION, FineTuneJobStatus
from kubetune.trainer.progressing import TrainerStatus

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"

# Backoff between failed patches: first retry after MIN, doubling up to MAX.
RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


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


class _Closed(Exception):
    """The patcher's deadline passed: no further attempt (not retried)."""


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
        self._wake = False  # a flush or the close cuts a backoff sleep short
        self._failures = 0
        self._deadline: float | None = None  # set when closing: the thread gives up after it
        self._hurry_until = -math.inf  # while flushing or closing, retries come quickly
        self._adopted = False
        self.patches_sent = 0
        self._backoff = tenacity.wait_exponential(multiplier=RETRY_MIN_SECONDS, exp_base=2, max=RETRY_MAX_SECONDS)
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
            self._wake = True
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
            self._wake = True
            self._cond.notify_all()
        self._thread.join(timeout + 0.5)
        if not self._thread.is_alive():  # else a request is in flight; the daemon thread ends after it
            self._client.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_not_exception_type(_Closed),
            wait=self._retry_delay, stop=self._past_deadline, sleep=self._sleep, after=self._failed, reraise=True,
        )
        while True:
            with self._cond:
                if not self._wait_for_work():
                    return
                self._urgent = False
            try:
                retrying(self._send)
            except Exception:  # noqa: BLE001 - the deadline passed while the API was failing
                return
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
            if self._urgent or self._deadline is not None:
                due = now
            else:
                due = self._last_sent + self._interval
            if self._deadline is not None:
                due = min(due, self._deadline)
            if now >= due:
                return True
            self._cond.wait(due - now)

    def _send(self) -> None:
        with self._cond:
            self._wake = False
            if self._deadline is not None and self._clock() >= self._deadline:
                raise _Closed
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

    # ------------------------------------------------------------------ tenacity's hooks

    def _retry_delay(self, state: tenacity.RetryCallState) -> float:
        delay = float(self._backoff(state))
        if self._clock() < self._hurry_until:
            delay = min(delay, RETRY_MIN_SECONDS)
        return delay

    def _past_deadline(self, state: tenacity.RetryCallState) -> bool:
        """Stop retrying when the next attempt would come after the closing deadline."""
        return self._deadline is not None and self._clock() + (state.upcoming_sleep or 0.0) >= self._deadline

    def _sleep(self, seconds: float) -> None:
        """Back off, but wake at once for a flush or the close."""
        with self._cond:
            until = self._clock() + seconds
            while not self._wake:
                left = until - self._clock()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _failed(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self._failures += 1
        if self._failures == 1:
            logger.warning("cannot report status to %s (%s); training goes on, retrying in the background",
                           self.target, describe_failure(exc) if exc else "unknown error")
        else:
            logger.debug("status report to %s failed again: %s", self.target,
                         describe_failure(exc) if exc else "unknown error")

    def _succeeded(self) -> None:
        if self._failures:
            logger.warning("status reporting to %s works again (after %d failed attempts)",
                           self.target, self._failures)
        self._failures = 0


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
