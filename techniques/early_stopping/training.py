"""Technique 13, early stopping: end the run when an eval metric stops improving; keep the best.

``techniques.earlyStopping`` (:class:`kubetune.techniques.early_stopping.EarlyStoppingSpec`). ``on_evaluate``
watches ``metric`` after every evaluation during training (the one before training only checks
that the metric exists, so a typo fails before any step is spent). An evaluation improves when it
beats the best so far by more than ``minDelta`` (lower for ``mode: min``, higher for ``max``); the
first evaluation during training sets the best. After ``patience`` evaluations in a row without
improvement it sets ``ctx.should_stop`` with a reason the loop reports as the stop reason
(``status.progress.stopReason: "early-stopped: eval_loss did not improve …"``), from which the
operator sets the ``EarlyStopped`` condition.

Each improvement sets ``ctx.checkpoint_requested``, so the loop writes a checkpoint of exactly
that step with its metrics; ``checkpoints.save`` records it in ``best.json`` (the API makes
``checkpointing.metric``/``mode`` agree with this block), and the export at the end takes the
best checkpoint, not the last (``output.exportBest``). A resumed run starts counting patience
again from its first evaluation.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import Problem, SpecError
from kubetune.trainer.techniques.base import Technique, TechniqueContext

WHERE = "spec.techniques.earlyStopping"


class EarlyStopping(Technique):
    name = "earlyStopping"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.config.mode == "min":
            return value < self.best - self.config.min_delta
        return value > self.best + self.config.min_delta

    def on_evaluate(self, ctx: TechniqueContext, metrics: dict[str, float]) -> None:
        c = self.config
        if c.metric not in metrics:
            raise SpecError([Problem(
                f"{WHERE}.metric",
                f"the evaluation reports no {c.metric!r}; it reports {', '.join(sorted(metrics)) or 'nothing'}",
            )])
        if ctx.step == 0:
            return
        value = float(metrics[c.metric])
        if self.improves(value):
            self.best, self.best_step, self.bad_evaluations = value, ctx.step, 0
            ctx.checkpoint_requested = True
        else:
            self.bad_evaluations += 1
        ctx.state[self.name] = {"best": self.best, "bestStep": self.best_step, "badEvaluations": self.bad_evaluations}
        if self.bad_evaluations >= c.patience:
            ctx.should_stop = True
            ctx.stop_reason = (
                f"{c.metric} did not improve by more than {c.min_delta:g} for {c.patience} evaluations "
                f"(best {self.best:.6g} at step {self.best_step})"
            )

    def describe(self, ctx: TechniqueContext) -> str | None:
        if self.best is None:
            return f"watched {self.config.metric}; no evaluation after the first"
        stopped = "stopped early" if ctx.should_stop else "did not stop early"
        return f"best {self.config.metric} {self.best:.6g} at step {self.best_step}; {stopped}"
