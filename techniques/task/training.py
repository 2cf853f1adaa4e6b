"""Technique 2 · task-specific fine-tuning: what the task adds on top of the head and the data format.

The head (classification, token classification, seq2seq, extractive QA, causal LM) is built by
``kubetune.trainer.models`` from ``techniques.task.type``; the per-format features, including
the masking of prompt tokens for instruction SFT (``lossOnResponseOnly``), come from
``kubetune.trainer.encoding``; accuracy/F1 (classification, NER) and exact match (QA) from
``kubetune.trainer.evaluating``. This plugin adds

* the metrics of generative tasks (seq2seq, instruction SFT, causal LM), after every evaluation
  (overall and per task): ``eval_token_accuracy``, the share of target tokens the model predicts
  (teacher forced, argmax), and ``eval_exact_match``, the share of examples whose every target
  token is predicted — exactly the examples greedy decoding reproduces verbatim;
* a check, before training, that instruction SFT leaves something to learn and masks the prompt:
  the share of masked (prompt) tokens is recorded in ``ctx.state["task"]["masked_fraction"]``.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.techniques.base import Technique, TechniqueContext

IGNORE_INDEX = -100
GENERATIVE_HEADS = frozenset({"seq2seq", "causal-lm"})


def token_hits(head: str, logits: Any, labels: Any) -> tuple[Any, Any]:
    """Per row: (correctly predicted target tokens, target tokens)."""
    if head == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
        logits = logits[:, -labels.shape[1] :]  # virtual tokens of prompt/prefix tuning
    mask = labels != IGNORE_INDEX
    hits = (logits.argmax(-1) == labels) & mask
    return hits.sum(-1), mask.sum(-1)


class Task(Technique):
    """Generative-task metrics and the SFT masking check (see the module doc)."""

    name = "task"

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        train = (getattr(ctx, "datasets", None) or {}).get("train")
        if train is not None and self.config.type == "instruction":
            masked = total = 0
            for features in train.features:
                labels = features["labels"]
                masked += sum(1 for label in labels if label == IGNORE_INDEX)
                total += len(labels)
            ctx.state.setdefault(self.name, {})["masked_fraction"] = masked / max(total, 1)
        return model

    def on_evaluate(self, ctx: TechniqueContext, metrics: dict[str, float]) -> None:
        head = ctx.head or self.spec.head
        dataset = (getattr(ctx, "datasets", None) or {}).get("eval")
        model = getattr(ctx, "model", None)
        if head not in GENERATIVE_HEADS or dataset is None or model is None or not len(dataset):
            return
        import torch

        from kubetune.trainer.batching import micro_batches, model_inputs

        was_training = model.training
        model.eval()
        sums: dict[str, list[float]] = {}  # task → [hit tokens, tokens, exact rows, rows]
        with torch.no_grad():
            for chunk in micro_batches(list(range(len(dataset))), ctx.micro_batch_size or 8):
                batch = ctx.collate([dataset[i] for i in chunk])
                outputs = model(**model_inputs(batch, ctx.device or "cpu"))
                hits, counts = token_hits(head, outputs.logits.float().cpu(), batch["labels"])
                for task, hit, count in zip(batch["_task"], hits.tolist(), counts.tolist()):
                    for key in ("", task):
                        s = sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])
                        s[0] += hit
                        s[1] += count
                        s[2] += 1.0 if count and hit == count else 0.0
                        s[3] += 1.0
        if was_training:
            model.train()
        several = len(sums) > 2
        for key, (hit, count, exact, rows) in sums.items():
            if key and not several:
                continue
            prefix = f"{key}/" if key else ""
            if count:
                metrics[f"{prefix}eval_token_accuracy"] = hit / count
            metrics[f"{prefix}eval_exact_match"] = exact / rows

    def describe(self, ctx: TechniqueContext) -> str | None:
        masked = ctx.state.get(self.name, {}).get("masked_fraction")
        line = f"{self.config.type} with the {ctx.head} head"
        return line + (f"; {masked:.0%} of the tokens (prompts) masked out of the loss" if masked is not None else "")
