"""The task's cross-entropy, written out where a technique needs it in its own hands.

The model's forward computes the task loss with transformers' conventions; a technique that
changes that loss — label smoothing (regularisation), a CE term weighed against a KL term
(distillation) — needs the same cross-entropy from the logits and the labels, position for
position. Both use these functions, so neither imports the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Label of positions that carry no target (prompt tokens, padding), as transformers uses it.
IGNORE_INDEX = -100


def aligned(head: str, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that carry a target, and the mask of those positions."""
    if head == "sequence-classification" or labels is None:
        return logits, torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if head == "causal-lm":
        labels = labels[:, 1:]
        logits = logits[:, :-1][:, -labels.shape[1] :]
    else:
        logits = logits[:, -labels.shape[1] :]
    return logits, labels != IGNORE_INDEX


def hard_loss(head: str, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The task's cross-entropy with label smoothing (HF's conventions for each head)."""
    if head == "sequence-classification":
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    logits, mask = aligned(head, logits, labels)
    if head == "causal-lm":
        labels = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )
