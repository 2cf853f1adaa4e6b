"""Technique 15 · curriculum learning: easy examples first, harder ones paced in.

Every training example gets a difficulty (``curriculum.difficulty``):

* ``length`` — its number of tokens;
* ``score`` — the number in column ``scoreField`` of its row (a missing or non-numeric value is an
  error naming the row);
* ``loss`` — the loss of the *initial* model on it (one forward pass per example, before the first
  step; the model is the one ``prepare_model`` saw). With a freshly initialised task head this
  ranks by the head's random guess (the "easy" start is then mostly one class), so prefer
  ``length`` or ``score`` for new classification heads; ``loss`` suits pretrained heads (causal LM).

Examples are ranked by difficulty (ties in a seeded random order; ``reverse`` ranks hard first).
A pacing function gives the fraction of the ranking available at training progress ``t`` (0 at the
first example, 1 at the last one the run will see), with ``s = startFraction`` and
``x = min(1, t / fullAt)``:

========  =========================================================
linear    s + (1 − s)·x
root      sqrt(s² + (1 − s²)·x)          (competence-based, root-2)
step      s + (1 − s)·⌊x·stages⌋ / stages   (1 once x reaches 1)
========  =========================================================

``order_batches`` builds each epoch's order position by position: the next example is drawn from
the examples available at that position's progress that this epoch has not used yet (refilled when
exhausted), so the run covers the available data instead of repeating a few easy examples. The
order is a pure function of the seed, the epoch and the difficulties, so a resumed run sees the same
stream. The difficulties and the schedule are in ``ctx.state["curriculum"]`` for logging and tests.
"""

from __future__ import annotations

import math
import random
from typing import Any

from kubetune.trainer.techniques.base import Technique, TechniqueContext


def available_fraction(config: Any, progress: float) -> float:
    """Fraction of the ranked data available at training progress ``progress`` ∈ [0, 1]."""
    s = config.start_fraction
    x = min(1.0, max(0.0, progress) / config.full_at) if config.full_at > 0 else 1.0
    if config.pacing == "linear":
        g = s + (1.0 - s) * x
    elif config.pacing == "root":
        g = math.sqrt(s * s + (1.0 - s * s) * x)
    else:
        g = 1.0 if x >= 1.0 else s + (1.0 - s) * math.floor(x * config.stages) / config.stages
    return min(1.0, max(g, 0.0))


def available_count(config: Any, progress: float, n: int) -> int:
    """How many of the ``n`` easiest examples are available at ``progress`` (at least one)."""
    return max(1, min(n, math.ceil(available_fraction(config, progress) * n - 1e-9)))


def paced_order(ranking: list[int], config: Any, start: int, total: int, length: int, rng: random.Random) -> list[int]:
    """``length`` indices for the positions ``start``… of a run of ``total`` positions (see the module doc)."""
    n = len(ranking)
    order: list[int] = []
    pool: list[int] = []
    admitted = 0
    used: set[int] = set()
    for j in range(length):
        progress = (start + j) / max(total - 1, 1)
        k = available_count(config, progress, n)
        if k > admitted:
            pool.extend(r for r in range(admitted, k) if r not in used)
            admitted = k
        if not pool:
            used.clear()
            pool = list(range(admitted))
        pick = pool.pop(rng.randrange(len(pool)))
        used.add(pick)
        order.append(ranking[pick])
    return order


class Curriculum(Technique):
    """Ranks examples by difficulty and paces them in (see the module doc)."""

    name = "curriculum"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.model: Any = None
        self.difficulty: list[float] | None = None

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        self.model = model  # the initial model, for difficulty "loss"
        return model

    def difficulties(self, ctx: TechniqueContext, dataset: Any) -> list[float]:
        how = self.config.difficulty
        if how == "length":
            return [float(len(f["input_ids"])) for f in dataset.features]
        if how == "score":
            key = self.config.score_field
            out = []
            for e in dataset.examples:
                value = e.get(key)
                try:
                    out.append(float(value))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{e.get('_origin', '?')}: row {e.get('_row', '?')}, field {key!r}: curriculum difficulty "
                        f"'score' needs a number (spec.techniques.curriculum.scoreField), got {value!r}"
                    ) from None
            return out
        return self._initial_losses(ctx, dataset)

    def _initial_losses(self, ctx: TechniqueContext, dataset: Any) -> list[float]:
        import torch

        from kubetune.trainer.batching import Collator, model_inputs

        if self.model is None:
            raise RuntimeError("curriculum difficulty 'loss' needs the model; prepare_model was not called")
        model = self.model
        pad = getattr(ctx.tokenizer, "pad_token_id", None) or 0
        collate = Collator(pad)
        was_training = model.training
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(len(dataset)):
                item = dict(dataset.features[i], _index=i, _task="")
                outputs = model(**model_inputs(collate([item]), ctx.device or "cpu"))
                losses.append(float(outputs.loss))
        if was_training:
            model.train()
        return losses

    def order_batches(self, ctx: TechniqueContext, dataset: Any) -> list[int] | None:
        if self.difficulty is None:
            self.difficulty = self.difficulties(ctx, dataset)
        n = len(self.difficulty)
        seed = self.spec.training.seed
        tie = random.Random(seed).random
        keys = [(d, tie()) for d in self.difficulty]
        ranking = sorted(range(n), key=lambda i: keys[i], reverse=self.config.reverse)
        t = self.spec.training
        per_step = t.micro_batch_size * t.gradient_accumulation_steps * max(ctx.world_size, 1)
        epoch = int(ctx.epoch)
        total = ctx.total_steps * per_step if ctx.total_steps else n * max(1, math.ceil(t.epochs or 1))
        order = paced_order(ranking, self.config, epoch * n, total, n, random.Random(seed * 104729 + epoch))
        ctx.state[self.name] = {"difficulty": self.difficulty, "ranking": ranking, "total_positions": total, "per_step": per_step}
        return order

    def describe(self, ctx: TechniqueContext) -> str | None:
        progress = ctx.step / ctx.total_steps if ctx.total_steps else 1.0
        fraction = available_fraction(self.config, progress)
        return f"ordered by {self.config.difficulty} ({self.config.pacing} pacing); {fraction:.0%} of the data available at the last step"
