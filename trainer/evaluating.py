"""Evaluation on the eval split: loss, perplexity, and the task's metrics, summed over all ranks.

Called by the training loop (``kubetune.trainer.training``) before training starts (the
"before" numbers), every ``data.eval.everySteps`` steps (else at each epoch end), and at the end.
Each rank evaluates its shard; counts are all-reduced, so the numbers are those of the whole eval
set. Every rank runs the same number of forward passes (short shards repeat an example with weight
0), which ZeRO-3's parameter gathering needs.

Metrics (keys as they appear in status, TensorBoard and ``checkpointing.metric``):

* every head: ``eval_loss``; causal-lm and seq2seq also ``eval_perplexity``;
* sequence-classification: ``eval_accuracy``, ``eval_f1`` (macro over classes);
* token-classification: ``eval_accuracy`` and ``eval_f1`` over labelled tokens (macro);
* question-answering: ``eval_exact_match`` (start and end both right);
* with several tasks, the same per task as ``<task>/eval_loss``, ``<task>/eval_accuracy``, …
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kubetune.trainer.batching import micro_batches, model_inputs
from kubetune.trainer.engines import all_reduce

IGNORE_INDEX = -100


class _Tally:
    """Sums for one task: loss × weight, weight, and a confusion matrix or exact-match counts."""

    def __init__(self, num_labels: int) -> None:
        self.loss = 0.0
        self.count = 0.0
        self.correct = 0.0
        self.total = 0.0
        self.confusion = torch.zeros(max(num_labels, 1), max(num_labels, 1), dtype=torch.float64)

    def vector(self) -> torch.Tensor:
        head = torch.tensor([self.loss, self.count, self.correct, self.total], dtype=torch.float64)
        return torch.cat([head, self.confusion.flatten()])

    def load(self, vec: torch.Tensor) -> None:
        self.loss, self.count, self.correct, self.total = (float(x) for x in vec[:4])
        self.confusion = vec[4:].reshape(self.confusion.shape)


def _macro_f1(confusion: torch.Tensor) -> float:
    tp = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    present = (actual + predicted) > 0
    f1 = torch.where(present, 2 * tp / (actual + predicted).clamp(min=1e-12), torch.zeros_like(tp))
    return float(f1[present].mean()) if bool(present.any()) else 0.0


@torch.no_grad()
def evaluate(
    engine: Any,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    head: str,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: Any,
    num_labels: int = 0,
    tasks: list[str] | None = None,
    forward: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, float]:
    """Metrics of ``engine``'s model on ``dataset`` (an EncodedDataset without augmentation)."""
    model = engine.module if hasattr(engine, "module") else engine
    was_training = model.training
    model.eval()
    n = len(dataset)
    per_rank = math.ceil(n / world_size)
    mine = list(range(rank, n, world_size))
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + [0] * (per_rank - len(mine))
    task_names = tasks if tasks and len(tasks) > 1 else []
    tallies = {name: _Tally(num_labels) for name in ["", *task_names]}
    for chunk in micro_batches(list(range(per_rank)), micro_batch_size):
        items = [dataset[mine[i]] for i in chunk]
        w = torch.tensor([weights[i] for i in chunk], dtype=torch.float64)
        batch = collate(items)
        inputs = model_inputs(batch, device)
        outputs = forward(inputs) if forward is not None else engine(**inputs)
        for name, tally in tallies.items():
            select = w.clone()
            if name:
                select *= torch.tensor([1.0 if t == name else 0.0 for t in batch["_task"]], dtype=torch.float64)
            _accumulate(tally, head, batch, outputs, select)
    for tally in tallies.values():
        vec = tally.vector()
        if world_size > 1:
            vec = all_reduce(vec)
        tally.load(vec)
    if was_training:
        model.train()
    metrics: dict[str, float] = {}
    for name, tally in tallies.items():
        prefix = f"{name}/" if name else ""
        metrics.update({f"{prefix}{k}": v for k, v in _metrics(tally, head).items()})
    return metrics


def _accumulate(tally: _Tally, head: str, batch: dict[str, Any], outputs: Any, w: torch.Tensor) -> None:
    if head in {"causal-lm", "seq2seq"}:
        labels = batch["labels"]
        logits = outputs.logits.float().cpu()
        if head == "causal-lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
            # Prompt/prefix tuning prepends virtual tokens to the logits.
            logits = logits[:, -labels.shape[1] :]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).reshape(labels.shape)
        tokens = (labels != IGNORE_INDEX).double()
        tally.loss += float((losses.double() * tokens).sum(1) @ w)
        tally.count += float(tokens.sum(1) @ w)
        return
    if head == "sequence-classification":
        logits = outputs.logits.float().cpu()
        labels = batch["labels"]
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
        tally.loss += float(losses @ w)
        tally.count += float(w.sum())
        _confuse(tally, labels, logits.argmax(-1), w)
        return
    if head == "token-classification":
        logits = outputs.logits.float().cpu()
        labels = batch["labels"]
        logits = logits[:, -labels.shape[1] :]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).reshape(labels.shape)
        mask = labels != IGNORE_INDEX
        tally.loss += float((losses.double() * mask).sum(1) @ w)
        tally.count += float(mask.double().sum(1) @ w)
        weights = w[:, None].expand_as(labels)[mask]
        _confuse(tally, labels[mask], logits.argmax(-1)[mask], weights)
        return
    if head == "question-answering":
        start_logits, end_logits = outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu()
        starts, ends = batch["start_positions"], batch["end_positions"]
        ce = torch.nn.functional.cross_entropy
        losses = (ce(start_logits, starts, reduction="none") + ce(end_logits, ends, reduction="none")).double() / 2
        tally.loss += float(losses @ w)
        tally.count += float(w.sum())
        hit = ((start_logits.argmax(-1) == starts) & (end_logits.argmax(-1) == ends)).double()
        tally.correct += float(hit @ w)
        tally.total += float(w.sum())
        return
    raise ValueError(f"unknown head {head!r}")  # pragma: no cover


def _confuse(tally: _Tally, labels: torch.Tensor, predicted: torch.Tensor, weights: torch.Tensor) -> None:
    """Add weighted (label, prediction) counts to the confusion matrix."""
    n = tally.confusion.shape[0]
    index = labels.reshape(-1).long() * n + predicted.reshape(-1).long()
    tally.confusion += torch.bincount(index, weights=weights.reshape(-1).double(), minlength=n * n).reshape(n, n)


def _metrics(tally: _Tally, head: str) -> dict[str, float]:
    if tally.count == 0:
        return {}
    loss = tally.loss / tally.count
    out = {"eval_loss": loss}
    if head in {"causal-lm", "seq2seq"}:
        out["eval_perplexity"] = math.exp(min(loss, 50.0))
    if head in {"sequence-classification", "token-classification"}:
        total = float(tally.confusion.sum())
        if total:
            out["eval_accuracy"] = float(tally.confusion.diag().sum()) / total
            out["eval_f1"] = _macro_f1(tally.confusion)
    if head == "question-answering" and tally.total:
        out["eval_exact_match"] = tally.correct / tally.total
    return out
