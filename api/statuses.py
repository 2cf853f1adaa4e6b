"""The FineTuneJob status: the user's window onto a run.

Two writers share it and never overwrite each other's parts: the operator owns ``phase``,
``conditions``, times, ``restarts`` and ``observedGeneration``; the trainer (rank 0) owns
``initialization`` (the fetch step), ``progress``, ``checkpoints``, ``latestCheckpoint``, ``bestCheckpoint``, ``trials`` and
``bestTrial``. Lists are bounded so that status stays small for a million-step run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field

from kubetune.api.base import SpecModel

Phase = Literal["Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[Phase, ...] = ("Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended")
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})

#: At most this many checkpoints are listed in status (the newest, plus the best).
MAX_CHECKPOINTS_IN_STATUS = 10
#: At most this many trials are listed in status (the best ones are kept).
MAX_TRIALS_IN_STATUS = 20
#: At most this many intermediate values (the newest) are listed per trial.
MAX_INTERMEDIATE_IN_STATUS = 10
#: At most this many per-task metrics are listed.
MAX_METRICS = 64


class ConditionType:
    """Condition types, one condition of each type at most."""

    CREATED = "Created"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    SPEC_REJECTED = "SpecRejected"
    EARLY_STOPPED = "EarlyStopped"

    ALL = (CREATED, INITIALIZING, RUNNING, SUCCEEDED, FAILED, SUSPENDED, SPEC_REJECTED, EARLY_STOPPED)


class Reason:
    """Machine-readable reasons carried by conditions and Events."""

    RESOURCES_CREATED = "ResourcesCreated"
    INVALID_SPEC = "InvalidSpec"
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"
    JOB_CREATED = "JobCreated"
    PODS_PENDING = "PodsPending"
    PODS_RUNNING = "PodsRunning"
    TRAINING_STARTED = "TrainingStarted"
    JOB_SUCCEEDED = "JobSucceeded"
    JOB_FAILED = "JobFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    OOM_KILLED = "OOMKilled"
    SUSPENDED = "JobSuspended"
    RESUMED = "JobResumed"
    QUEUED = "QueuedForAdmission"
    EARLY_STOPPED = "EarlyStopped"
    METRIC_PLATEAU = "MetricPlateau"
    JOB_RECREATED = "JobRecreated"
    NAME_TAKEN = "NameTaken"
    CREATE_REFUSED = "CreateRefused"


class Condition(SpecModel):
    """A condition of the job, keyed by type."""

    model_config = ConfigDict(extra="ignore", strict=False)

    type: str = Field(description="Condition type (Created, Initializing, Running, Succeeded, Failed, Suspended, SpecRejected, EarlyStopped).")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="Generation of the spec this condition was computed from.")


class Progress(SpecModel):
    """Training progress, reported by the trainer's rank 0 (throttled)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    percent: float | None = Field(default=None, description="Percent done, 0-100.")
    loss: float | None = Field(default=None, description="Training loss (smoothed over the last log interval).")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    eval_step: int | None = Field(default=None, description="Optimizer step of the latest evaluation (evalLoss, metrics).")
    metrics: dict[str, float] | None = Field(default=None, description="Latest evaluation metrics (accuracy, f1, perplexity, per task).")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput, all ranks.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds left.")
    updated_at: str | None = Field(default=None, description="When this progress was reported (RFC 3339).")
    stop_reason: str | None = Field(default=None, max_length=1024, description="Why training ended, set by the trainer at the end: completed, max-steps, early-stopped: <why>.")


class CheckpointRecord(SpecModel):
    """A checkpoint on the job's volume."""

    model_config = ConfigDict(extra="ignore", strict=False)

    step: int = Field(description="Optimizer step of the checkpoint.")
    path: str = Field(description="Path on the job's volume.")
    metrics: dict[str, float] | None = Field(default=None, description="Eval metrics at that step.")
    time: str | None = Field(default=None, description="When it was written (RFC 3339).")


class TrialRecord(SpecModel):
    """A hyperparameter-search trial."""

    model_config = ConfigDict(extra="ignore", strict=False)

    index: int = Field(description="Trial number.")
    parameters: dict[str, str] = Field(default_factory=dict, description="Values tried, by spec path, as YAML scalars.")
    metric: float | None = Field(default=None, description="The objective's value.")
    state: Literal["Pending", "Running", "Succeeded", "Failed", "Pruned"] = Field(default="Pending", description="Trial state.")
    intermediate: dict[str, float] | None = Field(
        default=None, description=f"The objective at each evaluation, by optimizer step (the newest {MAX_INTERMEDIATE_IN_STATUS}).")
    pruned_at_step: int | None = Field(default=None, description="The step the pruner stopped the trial at (state Pruned; metric is its value there).")


class Initialization(SpecModel):
    """What the fetch step (the trainer pods' init container) has fetched into the job's cache."""

    model_config = ConfigDict(extra="ignore", strict=False)

    sources_total: int = Field(default=0, description="Remote sources (s3://, hf://) the job reads.")
    sources_fetched: int = Field(default=0, description="Of those, how many are in the cache now.")
    bytes_fetched: int = Field(default=0, description="Bytes downloaded so far (0 when every source was already cached).")
    current: str | None = Field(default=None, max_length=1024, description="The source being fetched now.")
    done: bool = Field(default=False, description="Every source is in the cache.")


class FineTuneJobStatus(SpecModel):
    """Observed state of a FineTuneJob."""

    model_config = ConfigDict(extra="ignore", strict=False)

    phase: Phase | None = Field(default=None, description="Pending, Initializing, Running, Succeeded, Failed or Suspended.")
    message: str | None = Field(default=None, description="One line on the current state.")
    techniques: str | None = Field(default=None, description="Techniques in use, comma-separated (for kubectl get).")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions keyed by type.")
    initialization: Initialization | None = Field(default=None, description="Model and data fetched before training (phase Initializing).")
    progress: Progress | None = Field(default=None, description="Training progress from the trainer.")
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, description=f"Newest checkpoints (at most {MAX_CHECKPOINTS_IN_STATUS}).")
    latest_checkpoint: str | None = Field(default=None, description="Path of the newest checkpoint.")
    best_checkpoint: str | None = Field(default=None, description="Path of the best checkpoint by the eval metric.")
    output_path: str | None = Field(default=None, description="Where the final model was written.")
    trials: list[TrialRecord] = Field(default_factory=list, description=f"Hyperparameter-search trials (at most {MAX_TRIALS_IN_STATUS}).")
    best_trial: TrialRecord | None = Field(default=None, description="Best trial so far.")
    start_time: str | None = Field(default=None, description="When the trainer pods first started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job ended (RFC 3339).")
    restarts: int = Field(default=0, description="Pod restarts so far.")
    observed_generation: int | None = Field(default=None, description="The spec generation the operator last acted on.")


#: How ``progress.stopReason`` starts when a technique (early stopping) ended training before its
#: planned steps; the trainer writes it, the operator and the local run turn it into a condition.
EARLY_STOP_PREFIX = "early-stopped: "


def early_stop_condition(progress: Progress | Mapping[str, Any] | None) -> Condition | None:
    """The ``EarlyStopped`` condition (reason ``MetricPlateau``) that the trainer's stop reason
    calls for, or None when training was not stopped early."""
    if isinstance(progress, Mapping):
        reason = progress.get("stopReason") or progress.get("stop_reason")
    else:
        reason = progress.stop_reason if progress is not None else None
    if not isinstance(reason, str) or not reason.startswith(EARLY_STOP_PREFIX):
        return None
    why = reason[len(EARLY_STOP_PREFIX):].strip() or "a technique asked to stop"
    return Condition(type=ConditionType.EARLY_STOPPED, status="True", reason=Reason.METRIC_PLATEAU,
                     message=f"training stopped early: {why}")


def status_key(name: str) -> str:
    """The JSON key of the status field ``name`` (``start_time`` -> ``startTime``), from the model."""
    field = FineTuneJobStatus.model_fields[name]
    return field.alias or name


def condition_key(name: str) -> str:
    """The JSON key of the condition field ``name`` (``last_transition_time`` -> ...), from the model."""
    field = Condition.model_fields[name]
    return field.alias or name


def status_fields(**values: Any) -> dict[str, Any]:
    """Status fields by their model names, validated by :class:`FineTuneJobStatus` and written with
    its JSON keys: ``status_fields(observed_generation=2)`` -> ``{"observedGeneration": 2}``. Only
    the fields given are in the result (a None stays None: merge-patch removes it)."""
    status = FineTuneJobStatus.model_validate(values)
    dumped = status.model_dump(mode="json", by_alias=True, include=set(values))
    return {key: _without_none(value) for key, value in dumped.items()}


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value
