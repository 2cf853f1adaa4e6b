"""Technique 5 · multi-task learning: several datasets in one run, mixed by weights, with task prefixes.

Each training dataset is one task (``dataset.task``, else its name). The plugin

* draws every epoch's example order (``order_batches``) as a seeded mixture: each position picks a
  task with the probability ``multiTask.sampling`` gives, then the next example of that task (each
  task's examples cycle in a reshuffled order, so small tasks repeat and large ones are
  subsampled rather than the mix drifting towards the big ones). The probabilities are

  ===============  ====================================================
  weights          ``dataset.weight`` normalised
  proportional     dataset sizes normalised
  temperature      size^(1/T) normalised (T = ``multiTask.temperature``)
  uniform          equal
  ===============  ====================================================

* prepends ``"<task>: "`` to every example's input when ``taskPrefixes`` is on (train and eval, so
  the model knows the task at evaluation too; see ``inputs.prepend``);
* keeps the per-task eval metrics (``<task>/eval_loss``, ``<task>/eval_accuracy``, …, computed by
  ``kubetune.trainer.evaluating``) in status, or drops them when ``perTaskMetrics`` is off.

The realised mix of the last epoch is in ``ctx.state["multiTask"]["mix"]`` (task → fraction).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from kubetune.trainer.batching import mixed_order
from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.techniques.inputs import prepend


def task_probabilities(spec: Any, sizes: dict[str, int]) -> dict[str, float]:
    """Sampling probability of each task (see the module doc); ``sizes`` are training examples per task."""
    cfg = spec.techniques.multi_task
    weights: dict[str, float] = {}
    for i, ds in enumerate(spec.data.datasets):
        task = ds.task or ds.name or f"dataset-{i}"
        weights[task] = weights.get(task, 0.0) + ds.weight
    tasks = [t for t in sizes if sizes[t] > 0]
    if cfg.sampling == "weights":
        raw = {t: weights.get(t, 1.0) for t in tasks}
    elif cfg.sampling == "proportional":
        raw = {t: float(sizes[t]) for t in tasks}
    elif cfg.sampling == "temperature":
        raw = {t: float(sizes[t]) ** (1.0 / cfg.temperature) for t in tasks}
    else:
        raw = {t: 1.0 for t in tasks}
    total = sum(raw.values())
    return {t: v / total for t, v in raw.items()}


class MultiTask(Technique):
    """Task prefixes, the weighted mixture of tasks, per-task metrics."""

    name = "multiTask"

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        if not self.config.task_prefixes:
            return examples
        return [prepend(e, f"{e.get('_task', '')}: ") for e in examples]

    def order_batches(self, ctx: TechniqueContext, dataset: Any) -> list[int] | None:
        task_of = [e.get("_task", "") for e in dataset.examples]
        sizes = Counter(task_of)
        probabilities = task_probabilities(self.spec, dict(sizes))
        epoch = int(ctx.epoch)
        rng = random.Random(self.spec.training.seed * 7919 + epoch)
        order = mixed_order(task_of, probabilities, len(task_of), rng)
        seen = Counter(task_of[i] for i in order)
        ctx.state.setdefault(self.name, {}).update(
            probabilities=probabilities, mix={t: seen[t] / len(order) for t in sorted(seen)}
        )
        return order

    def on_evaluate(self, ctx: TechniqueContext, metrics: dict[str, float]) -> None:
        if not self.config.per_task_metrics:
            tasks = {ds.task or ds.name or f"dataset-{i}" for i, ds in enumerate(self.spec.data.datasets)}
            for key in [k for k in metrics if k.partition("/")[0] in tasks and "/" in k]:
                del metrics[key]

    def describe(self, ctx: TechniqueContext) -> str | None:
        mix = ctx.state.get(self.name, {}).get("mix") or {}
        return f"{self.config.sampling} sampling; last epoch's mix " + ", ".join(f"{t} {share:.0%}" for t, share in mix.items())
