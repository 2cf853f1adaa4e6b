"""Turning encoded examples into micro-batches: epoch order, sharding across ranks, padding.

Called by the training loop (``kubetune.trainer.training``) and the evaluation
(``kubetune.trainer.evaluating``). The training stream is a deterministic function of the seed, the
epoch and the rank, which is what lets a restarted run skip exactly the micro-batches it already
trained on (checkpoints record the epoch and the micro-batch offset within it):

* :func:`epoch_order` gives the example order of an epoch: a technique's ``order_batches`` hook
  (curriculum, multi-task mixing) if one returns a list, else a seeded shuffle
  (``spec.data.shuffle``), else the file order;
* :func:`shard` pads the order by wrapping around so every rank gets the same number of
  micro-batches (DeepSpeed's collectives need it) and takes every ``world_size``-th index;
* :class:`Collator` pads a list of features into tensors (right padding, ``-100`` labels,
  attention masks); keys starting with ``_`` are bookkeeping that reaches the technique hooks but
  not the model (``_index`` example indices, ``_task`` task names);
* with ``training.packing`` the micro-batches come from :mod:`kubetune.trainer.packing` instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100

#: Feature keys that hold one scalar per example (not a sequence).
SCALAR_KEYS = frozenset({"start_positions", "end_positions"})


class EncodedDataset(torch.utils.data.Dataset):
    """Encoded features of one split; training examples pass through the ``augment`` hooks on access.

    ``augment`` is called with a ``random.Random`` seeded by (seed, epoch, index), so augmentation is
    reproducible and a resumed run sees the same augmented examples it would have seen.
    """

    def __init__(
        self,
        features: list[dict[str, Any]],
        examples: list[dict[str, Any]],
        augment: Callable[[dict[str, Any], random.Random], dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        self.features = features
        self.examples = examples
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.features[index])
        item["_index"] = index  # augment hooks re-encode from the example (word-level augmentation)
        if self.augment is not None:
            rng = random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)
            item = self.augment(item, rng)
        item["_index"] = index
        item["_task"] = self.examples[index].get("_task", "")
        return item

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool, hooked: Sequence[int] | None) -> list[int]:
    """Example indices for one epoch (see the module doc)."""
    if hooked is not None:
        order = [int(i) for i in hooked]
        bad = next((i for i in order if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"order_batches returned index {bad}, outside the {n} training examples")
        if not order:
            raise ValueError("order_batches returned an empty order")
        return order
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def mixed_order(group_of: Sequence[str], probabilities: dict[str, float], length: int, rng: random.Random) -> list[int]:
    """``length`` example indices whose groups (datasets or tasks) follow ``probabilities``; each
    group cycles through its own examples in a reshuffled order, so a small group repeats and a
    large one is subsampled instead of the mix drifting towards the big one."""
    pools: dict[str, list[int]] = {}
    for index, group in enumerate(group_of):
        pools.setdefault(group, []).append(index)
    groups = sorted(g for g in probabilities if g in pools)
    weights = [probabilities[g] for g in groups]
    queues: dict[str, list[int]] = {g: [] for g in groups}
    order = []
    for group in rng.choices(groups, weights=weights, k=length):
        if not queues[group]:
            queues[group] = pools[group][:]
            rng.shuffle(queues[group])
        order.append(queues[group].pop())
    return order


def weighted_dataset_order(spec: Any, examples: Sequence[dict[str, Any]], epoch: int) -> list[int] | None:
    """The epoch's order when ``data.datasets[].weight`` differ: a seeded mixture by weight (the
    multi-task plugin does the same per task, with more sampling modes). None when all weights
    are equal, which keeps the plain (shuffled) order."""
    weights: dict[str, float] = {}
    for i, ds in enumerate(spec.data.datasets):
        weights[ds.name or f"dataset-{i}"] = ds.weight
    if len(set(weights.values())) <= 1:
        return None
    total = sum(weights.values())
    rng = random.Random(spec.training.seed * 7919 + epoch)
    return mixed_order([e.get("_dataset", "") for e in examples], {k: v / total for k, v in weights.items()}, len(examples), rng)


def shard(order: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of an epoch's order; every rank gets the same count (wrap-around padding)."""
    if world_size > 1 and len(order) % world_size:
        pad = world_size - len(order) % world_size
        order = order + (order * (pad // len(order) + 1))[:pad]
    return order[rank::world_size]


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class Collator:
    """Pads features into a batch of tensors (see the module doc)."""

    def __init__(self, pad_token_id: int, label_pad: int = IGNORE_INDEX) -> None:
        self.pad_token_id = pad_token_id
        self.label_pad = label_pad

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        keys = [k for k in items[0] if not k.startswith("_")]
        for prefix in ("", "chosen_", "rejected_"):
            if f"{prefix}input_ids" in items[0]:
                ids = [list(it[f"{prefix}input_ids"]) for it in items]
                width = max(len(x) for x in ids)
                batch[f"{prefix}input_ids"] = torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids])
                batch[f"{prefix}attention_mask"] = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        for key in keys:
            if key.endswith("input_ids"):
                continue
            values = [it[key] for it in items]
            if key in SCALAR_KEYS or not isinstance(values[0], (list, tuple)):
                batch[key] = torch.tensor(values)
                continue
            width = max(len(v) for v in values)
            pad = 0
            if key.endswith("labels"):
                pad = self.label_pad
                # Sequence labels aligned with input_ids share their width.
                base = key[: -len("labels")] + "input_ids"
                if base in batch and not _is_seq2seq_labels(items, key, base):
                    width = batch[base].shape[1]
            elif key == "token_type_ids":
                width = batch["input_ids"].shape[1]
            batch[key] = torch.tensor([list(v) + [pad] * (width - len(v)) for v in values])
        batch["_index"] = torch.tensor([it["_index"] for it in items])
        batch["_task"] = [it.get("_task", "") for it in items]
        return batch


def _is_seq2seq_labels(items: Sequence[dict[str, Any]], key: str, base: str) -> bool:
    """Decoder labels of an encoder-decoder have their own length."""
    return any(len(it[key]) != len(it[base]) for it in items)


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The part of a batch the model's forward takes, on ``device``."""
    skip = {"num_tokens", "num_documents"}
    out = {}
    for key, value in batch.items():
        if key.startswith("_") or key.startswith("chosen_") or key.startswith("rejected_") or key in skip:
            continue
        out[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    return out
