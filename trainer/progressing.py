"""Accumulating a run's status: the trainer-owned part of a FineTuneJob status, kept bounded.

:class:`TrainerStatus` is what both reporters (:mod:`kubetune.trainer.reporting`) record into:
progress every log interval, checkpoints as they are written and rotated, the end. It keeps the
record consistent (percent follows step/total, the ETA comes from the measured rate when the loop
gives none), bounded (at most ``MAX_CHECKPOINTS_IN_STATUS`` checkpoints, the best one kept, at
most ``MAX_METRICS`` finite metrics) and JSON-safe (no NaN). It does no I/O: the publisher
(:mod:`kubetune.trainer.publishing`) reads snapshots of it from another thread, hence the lock.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubetune.api import FineTuneJobStatus
from kubetune.api.statuses import MAX_CHECKPOINTS_IN_STATUS, MAX_METRICS, CheckpointRecord, Progress

_PROGRESS_NUMBERS = ("epoch", "percent", "loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds")
_PROGRESS_COUNTS = ("step", "total_steps")


def _alias(model: type, field: str) -> str:
    return model.model_fields[field].alias or field


def utc_now() -> str:
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


def bounded_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
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
        self.eval_step: int | None = None  # the step the latest eval metrics were computed at
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
            eval_step = _number(values.get("eval_step"))
            if eval_step is not None:
                self.eval_step = int(eval_step)
                current["eval_step"] = self.eval_step  # the search's pruner reads the metric by this step
            if values.get("metrics"):  # the latest evaluation's full set replaces the previous one
                current["metrics"] = bounded_metrics(values["metrics"]) or None
            current.setdefault("step", 0)
            self._make_consistent(current, eta_given="eta_seconds" in values and _number(values.get("eta_seconds")) is not None)
            current["updated_at"] = utc_now()
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

    def record_evaluation(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values = dict(metrics)
        eval_loss = values.pop("eval_loss", None)
        loss = values.pop("loss", None)
        if eval_loss is None:
            eval_loss = loss
        self.record_progress({"eval_loss": eval_loss, "metrics": values, "eval_step": step})

    def record_checkpoint(self, step: int, path: str, metrics: Mapping[str, Any] | None, best: bool) -> None:
        record = CheckpointRecord(step=int(step), path=str(path), metrics=bounded_metrics(metrics) or None, time=utc_now())
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
            current.update(stop_reason=str(reason), eta_seconds=0.0, updated_at=utc_now())
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
