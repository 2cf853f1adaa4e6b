"""Status stays bounded: a simulated million-step run, checkpointing every 100 steps and evaluating
every 1,000 with the most metrics a status keeps, leaves a FineTuneJob well under 64 KiB (etcd and
kubectl handle objects of that size without trouble; the API server's limit is ~1.5 MiB)."""

from __future__ import annotations

import json

from kubetune.api.statuses import MAX_CHECKPOINTS_IN_STATUS, MAX_METRICS
from kubetune.trainer.progressing import TrainerStatus
from tests.support.tiny_models import manifest

STEPS = 1_000_000
CHECKPOINT_EVERY = 100
EVAL_EVERY = 1_000
LIMIT = 64 * 1024


def _metrics(step: int) -> dict[str, float]:
    # The most a status keeps, with long per-task names (multi-task runs name a metric per dataset).
    return {f"eval/task-{i:02d}-customer-support-tickets/accuracy": 1.0 / (1 + step + i) for i in range(MAX_METRICS + 20)}


def _finetunejob(trainer: TrainerStatus) -> dict:
    body = manifest("/mnt/pvc/models/" + "m" * 200, "/mnt/pvc/data/" + "d" * 200, "text")
    body["metadata"] = {"name": "n" * 63, "namespace": "ns" * 31, "uid": "0" * 36, "resourceVersion": "123456789",
                        "generation": 7, "creationTimestamp": "2026-01-01T00:00:00Z"}
    status = trainer.status().model_dump(mode="json", by_alias=True, exclude_none=True)
    # What the operator adds: every condition type with a long message, the phase line, counters.
    status.update(phase="Running", message="training: step 999999 of 1000000", techniques="lora, curriculum",
                  restarts=12, observedGeneration=7, startTime="2026-01-01T00:00:00Z",
                  conditions=[{"type": t, "status": "True", "reason": "SomeReason", "message": "m" * 1024,
                               "lastTransitionTime": "2026-01-01T00:00:00Z"}
                              for t in ("Created", "Initializing", "Running", "Succeeded", "Failed", "Suspended",
                                        "SpecRejected", "EarlyStopped")])
    body["status"] = status
    return body


def test_a_million_step_run_keeps_the_finetunejob_under_64_kib() -> None:
    trainer = TrainerStatus()
    root = "/workspace/checkpoints/" + "j" * 63
    kept: list[str] = []
    largest = 0
    for step in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY):
        trainer.record_progress({"step": step, "total_steps": STEPS, "loss": 1.0 / step, "learning_rate": 1e-4,
                                 "tokens_per_second": 1234.5, "epoch": step / 5000})
        metrics = _metrics(step) if step % EVAL_EVERY == 0 else None
        if metrics:
            trainer.record_evaluation({"eval_loss": 1.0 / step, **metrics})
        path = f"{root}/step-{step:08d}"
        trainer.record_checkpoint(step, path, metrics, best=step == 5_000)  # an early best stays listed
        kept.append(path)
        if len(kept) > 3:  # checkpointing.keepLast 3: rotation deletes the oldest (the best is kept)
            gone = kept.pop(0)
            if not gone.endswith("step-00005000"):
                trainer.remove_checkpoint(gone)
        if step % 50_000 == 0:
            largest = max(largest, len(json.dumps(_finetunejob(trainer))))
    final = _finetunejob(trainer)
    size = len(json.dumps(final))
    assert max(size, largest) < LIMIT, (size, largest)
    status = final["status"]
    assert status["progress"]["step"] == STEPS
    assert len(status["checkpoints"]) <= MAX_CHECKPOINTS_IN_STATUS
    assert status["latestCheckpoint"].endswith(f"step-{STEPS:08d}")
    assert status["bestCheckpoint"].endswith("step-00005000")
    assert any(c["path"] == status["bestCheckpoint"] for c in status["checkpoints"])
    assert len(status["progress"]["metrics"]) <= MAX_METRICS
    assert all(len(c.get("metrics") or {}) <= MAX_METRICS for c in status["checkpoints"])
