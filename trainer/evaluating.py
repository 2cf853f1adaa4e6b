"""Evaluation on the eval split: loss, perplexity, and the task's metrics, over all ranks.

Called by the training loop (``kubetune.trainer.training``) before training starts (the
"before" numbers), every ``data.eval.everySteps`` steps (else at each epoch end), and at the end.
Each rank evaluates its shard; every number is a torchmetrics metric, whose states torchmetrics
synchronises across the process group when it computes, so the numbers are those of the whole eval
set. Every rank runs the same number of forward passes (short shards repeat an example with weight
0, left out of the metrics), which ZeRO-3's parameter gathering needs. The metric states live on
the model's device, so the same collectives work on gloo (CPU) and NCCL (GPU).

Metrics (keys as they appear in status, TensorBoard and ``checkpointing.metric``):

* every head: ``eval_loss`` (per token, or per example); causal-lm and seq2seq also
  ``eval_perplexity``;
* sequence-classification: ``eval_accuracy``, ``eval_f1`` (macro over the classes that occur);
* token-classification: ``eval_accuracy`` over labelled tokens and ``eval_f1``, the entity-level
  F1 of seqeval (micro over entities: an entity counts only when its span and type are both right).
  Tags are read as IOB2 (``B-PER``, ``I-PER``, ``O``; ``E-``/``S-`` too); plain tags (``PER``) as
  IO, where a run of the same tag is one entity;
* question-answering: ``eval_exact_match`` (start and end both right);
* with several tasks, the same per task as ``<task>/eval_loss``, ``<task>/eval_accuracy``, …

seqeval itself works on whole tag sequences of one process; :class:`EntityF1` keeps its counts
(true entities, predicted entities, correct ones, found by seqeval's ``get_entities``) as
torchmetrics states, so they are summed across ranks like any other metric. seqeval (which loads
scikit-learn) is imported when an entity F1 is first updated, not with this module: every trainer
process imports this module, few of them tag tokens, and the import costs about a second of CPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from kubetune.trainer.batching import micro_batches, model_inputs

IGNORE_INDEX = -100
_SEQEVAL_PREFIXES = ("B-", "I-", "E-", "S-")


def seqeval_tag(tag: str) -> str:
    """A tag as seqeval reads it: IOB2/IOBES tags as they are, a plain tag ``PER`` as IO (``I-PER``)."""
    return tag if tag == "O" or tag.startswith(_SEQEVAL_PREFIXES) else f"I-{tag}"


class EntityF1(Metric):
    """Entity-level micro F1 (seqeval's ``f1_score``), with counts that sum across ranks."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("correct", "predicted", "actual"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, actual: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        from seqeval.metrics.sequence_labeling import get_entities  # see the module doc

        for gold, guess in zip(actual, predicted):
            true_entities = set(get_entities([seqeval_tag(t) for t in gold]))
            found_entities = set(get_entities([seqeval_tag(t) for t in guess]))
            self.correct += len(true_entities & found_entities)
            self.predicted += len(found_entities)
            self.actual += len(true_entities)

    def compute(self) -> torch.Tensor:
        total = self.predicted + self.actual
        return 2 * self.correct.double() / total if int(total) else torch.tensor(0.0, dtype=torch.float64)


class _TaskMetrics:
    """The metrics of one task (or of all tasks together) for one head."""

    def __init__(self, head: str, labels: Sequence[str], device: Any) -> None:
        self.head = head
        self.labels = list(labels)
        self.loss = MeanMetric()
        self.metrics: dict[str, Metric] = {"eval_loss": self.loss}
        classes = max(len(self.labels), 1)
        if head in {"sequence-classification", "token-classification"}:
            self.metrics["eval_accuracy"] = MulticlassAccuracy(num_classes=classes, average="micro", validate_args=False)
        if head == "sequence-classification":
            self.metrics["eval_f1"] = MulticlassF1Score(num_classes=classes, average="macro", validate_args=False)
        if head == "token-classification":
            self.metrics["eval_f1"] = EntityF1()
        if head == "question-answering":
            self.metrics["eval_exact_match"] = MeanMetric()
        for metric in self.metrics.values():
            metric.to(device)
        self.device = device

    def update(self, batch: dict[str, Any], outputs: Any, keep: torch.Tensor) -> None:
        """Add one micro-batch; ``keep`` marks its examples that count (bool, one per example)."""
        head, device = self.head, self.device
        if not bool(keep.any()):  # torchmetrics' classification updates refuse empty tensors
            return
        if head in {"causal-lm", "seq2seq"}:
            labels = batch["labels"]
            logits = outputs.logits.float().cpu()
            if head == "causal-lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
                # Prompt/prefix tuning prepends virtual tokens to the logits.
                logits = logits[:, -labels.shape[1]:]
            losses = _token_losses(logits, labels)[keep]
            tokens = (labels != IGNORE_INDEX)[keep]
            self.loss.update(losses[tokens].to(device))
            return
        if head == "sequence-classification":
            logits, labels = outputs.logits.float().cpu()[keep], batch["labels"][keep]
            self.loss.update(torch.nn.functional.cross_entropy(logits, labels, reduction="none").to(device))
            predicted = logits.argmax(-1)
            self.metrics["eval_accuracy"].update(predicted.to(device), labels.to(device))
            self.metrics["eval_f1"].update(predicted.to(device), labels.to(device))
            return
        if head == "token-classification":
            labels = batch["labels"][keep]
            logits = outputs.logits.float().cpu()[keep]
            logits = logits[:, -labels.shape[1]:]
            losses = _token_losses(logits, labels)
            mask = labels != IGNORE_INDEX
            if not bool(mask.any()):
                return
            self.loss.update(losses[mask].to(device))
            predicted = logits.argmax(-1)
            self.metrics["eval_accuracy"].update(predicted[mask].to(device), labels[mask].to(device))
            names = self.labels
            actual = [[names[int(t)] for t in row[m]] for row, m in zip(labels, mask)]
            guessed = [[names[int(p)] if int(p) < len(names) else "O" for p in row[m]] for row, m in zip(predicted, mask)]
            self.metrics["eval_f1"].update(actual, guessed)
            return
        if head == "question-answering":
            start_logits, end_logits = outputs.start_logits.float().cpu()[keep], outputs.end_logits.float().cpu()[keep]
            starts, ends = batch["start_positions"][keep], batch["end_positions"][keep]
            ce = torch.nn.functional.cross_entropy
            losses = (ce(start_logits, starts, reduction="none") + ce(end_logits, ends, reduction="none")) / 2
            self.loss.update(losses.to(device))
            hit = ((start_logits.argmax(-1) == starts) & (end_logits.argmax(-1) == ends)).float()
            self.metrics["eval_exact_match"].update(hit.to(device))
            return
        raise ValueError(f"unknown head {head!r}")  # pragma: no cover

    def compute(self) -> dict[str, float]:
        """Every metric, synchronised across ranks (every rank must call this); {} when nothing counted."""
        with warnings.catch_warnings():
            # A rank (or a task) that saw no example is normal here; its states are zeros.
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            warnings.filterwarnings("ignore", message=".*No positive samples.*")
            values = {name: float(metric.compute()) for name, metric in self.metrics.items()}
        if not math.isfinite(values["eval_loss"]):  # MeanMetric of nothing is NaN: no example counted
            return {}
        if self.head in {"causal-lm", "seq2seq"}:
            values["eval_perplexity"] = math.exp(min(values["eval_loss"], 50.0))
        return values


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(labels.shape)


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
    labels: Sequence[str] | None = None,
    tasks: list[str] | None = None,
    forward: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, float]:
    """Metrics of ``engine``'s model on ``dataset`` (an EncodedDataset without augmentation).

    ``labels`` are the class (tag) names in label-id order; token classification needs them for
    entity F1 (without them, ids stand for names). ``num_labels`` is used when ``labels`` is not given.
    """
    model = engine.module if hasattr(engine, "module") else engine
    was_training = model.training
    model.eval()
    names = list(labels) if labels else [str(i) for i in range(num_labels)]
    n = len(dataset)
    per_rank = math.ceil(n / world_size)
    mine = list(range(rank, n, world_size))
    weights = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine = mine + [0] * (per_rank - len(mine))
    task_names = tasks if tasks and len(tasks) > 1 else []
    metric_device = torch.device(device) if not isinstance(device, torch.device) else device
    groups = {name: _TaskMetrics(head, names, metric_device) for name in ["", *task_names]}
    for chunk in micro_batches(list(range(per_rank)), micro_batch_size):
        items = [dataset[mine[i]] for i in chunk]
        counted = torch.tensor([weights[i] for i in chunk], dtype=torch.bool)
        batch = collate(items)
        inputs = model_inputs(batch, device)
        outputs = forward(inputs) if forward is not None else engine(**inputs)
        for name, group in groups.items():
            keep = counted.clone()
            if name:
                keep &= torch.tensor([t == name for t in batch["_task"]], dtype=torch.bool)
            group.update(batch, outputs, keep)
    if was_training:
        model.train()
    metrics: dict[str, float] = {}
    for name, group in groups.items():
        prefix = f"{name}/" if name else ""
        metrics.update({f"{prefix}{k}": v for k, v in group.compute().items()})
    return metrics
