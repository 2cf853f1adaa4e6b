"""Padding-free packing: many variable-length examples become one flat token stream per micro-batch.

Instruction data is mostly short (median ~300 tokens) with a long tail, so padding every row of a
batch to its longest row wastes most of the GPU. Here the examples of one micro-batch are laid end
to end into a single row of a fixed token budget instead:

* ``input_ids``  ``[1, T]`` – the documents back to back, then a tail of ``pad_token_id``;
* ``labels``     ``[1, T]`` – the example's labels, with ``-100`` on the first token of every
  document (HF shifts labels inside the loss, so that position would otherwise train the last
  token of one document to predict the first token of the next) and on the padding tail;
* ``position_ids`` ``[1, T]`` – restart at 0 for every document (rotary embeddings see each
  document exactly as if it were alone);
* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` – int32 ``[n_docs + 1]`` cumulative boundaries, the
  padding tail counted as one more (label-free) document so it attends only to itself;
* ``max_length_q`` / ``max_length_k`` – the longest document, a Python int (no device sync).

Those seven keys are the model inputs (the names are transformers' ``FlashAttentionKwargs``, so
they reach the attention function untouched); :mod:`kubetune.trainer.attention` turns the
boundaries into document-isolated attention. ``num_tokens`` (real tokens, padding excluded) and
``num_documents`` are counters for throughput reporting, not model inputs.

Who calls it: the trainer's data loading builds
``DataLoader(ds, batch_sampler=TokenBudgetBatchSampler(lengths, max_tokens), collate_fn=PackedCollator(max_tokens))``
and feeds each batch to :func:`kubetune.trainer.kernels.causal_lm_loss`; ``bench/`` does the same.
A fixed ``max_tokens`` keeps every micro-batch the same shape, so ``torch.compile`` compiles once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100

#: Keys of a packed batch that are model inputs (everything else is a counter).
MODEL_INPUT_KEYS = (
    "input_ids",
    "labels",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)


def pack_lengths(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    order: Sequence[int] | None = None,
    lookahead: int = 64,
    max_items: int | None = None,
) -> list[list[int]]:
    """Group example indices into micro-batches whose total length fits ``max_tokens``.

    First-fit over a window of ``lookahead`` open micro-batches, visiting examples in ``order``
    (default: index order). When more than ``lookahead`` are open, the fullest is closed. This keeps
    the data order nearly intact (no global sort by length) while filling bins to ~99%.
    ``max_items`` caps the examples per micro-batch (``training.packingMaxExamples``): a full bin
    is closed at once, so a run can keep an unpacked run's examples per step.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens: must be > 0, got {max_tokens}")
    if lookahead < 1:
        raise ValueError(f"lookahead: must be >= 1, got {lookahead}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items: must be >= 1, got {max_items}")
    order = range(len(lengths)) if order is None else order
    closed: list[list[int]] = []
    open_bins: list[tuple[int, list[int]]] = []  # (used tokens, indices)
    for index in order:
        length = int(lengths[index])
        if length <= 0:
            raise ValueError(f"lengths[{index}]: must be > 0, got {length}")
        if length > max_tokens:
            raise ValueError(
                f"lengths[{index}]: example of {length} tokens does not fit max_tokens={max_tokens}; "
                "truncate examples to the sequence length or raise the token budget"
            )
        for slot, (used, members) in enumerate(open_bins):
            if used + length <= max_tokens:
                members.append(index)
                open_bins[slot] = (used + length, members)
                if max_items is not None and len(members) >= max_items:
                    closed.append(open_bins.pop(slot)[1])
                break
        else:
            if max_items == 1:
                closed.append([index])
                continue
            open_bins.append((length, [index]))
            if len(open_bins) > lookahead:
                fullest = max(range(len(open_bins)), key=lambda s: open_bins[s][0])
                closed.append(open_bins.pop(fullest)[1])
    # Close the remaining ones oldest first, so output order follows input order.
    closed.extend(members for _, members in open_bins)
    return closed


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding index lists whose summed lengths fit ``max_tokens``.

    Deterministic for a given ``seed`` and epoch (call :meth:`set_epoch` between epochs). With
    ``num_replicas > 1`` every rank gets the same number of micro-batches (the last incomplete
    round is dropped), which DeepSpeed needs to keep its collectives in step.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        lookahead: int = 64,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank: must be in [0, {num_replicas}), got {rank}")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.lookahead = lookahead
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        pack_lengths(self.lengths, max_tokens, lookahead=lookahead)  # validate lengths now

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        batches = pack_lengths(self.lengths, self.max_tokens, order=order, lookahead=self.lookahead)
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[:usable][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class PackedCollator:
    """Collate a list of examples into one packed, padding-free micro-batch (see module doc).

    Each example is a mapping with ``input_ids`` (list of ints or 1-D tensor) and optionally
    ``labels`` of the same length (``-100`` where no loss is wanted, e.g. the prompt). Without
    ``labels`` every token is a target. ``max_tokens`` fixes ``T`` (the stream is padded up to it);
    ``max_tokens=None`` pads only up to a multiple of ``pad_to_multiple_of``.
    """

    def __init__(
        self,
        max_tokens: int | None = None,
        *,
        pad_token_id: int = 0,
        pad_to_multiple_of: int = 1,
    ) -> None:
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens: must be > 0, got {max_tokens}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of: must be >= 1, got {pad_to_multiple_of}")
        self.max_tokens = max_tokens
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("examples: a packed micro-batch needs at least one example")
        ids: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        for i, example in enumerate(examples):
            if "input_ids" not in example:
                raise ValueError(f"examples[{i}].input_ids: missing")
            x = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)
            if x.numel() == 0:
                raise ValueError(f"examples[{i}].input_ids: empty example")
            y = example.get("labels")
            y = x.clone() if y is None else torch.as_tensor(y, dtype=torch.long).reshape(-1).clone()
            if y.shape != x.shape:
                raise ValueError(
                    f"examples[{i}].labels: length {y.numel()} differs from input_ids length {x.numel()}"
                )
            y[0] = IGNORE_INDEX  # no prediction across the boundary with the previous document
            ids.append(x)
            labels.append(y)
        doc_lengths = [x.numel() for x in ids]
        real = sum(doc_lengths)
        if self.max_tokens is not None:
            if real > self.max_tokens:
                raise ValueError(
                    f"examples: {real} tokens exceed max_tokens={self.max_tokens}; "
                    "use TokenBudgetBatchSampler with the same max_tokens"
                )
            total = self.max_tokens
        else:
            m = self.pad_to_multiple_of
            total = (real + m - 1) // m * m
        pad = total - real
        positions = [torch.arange(n, dtype=torch.long) for n in doc_lengths]
        seq_lengths = list(doc_lengths)
        if pad:
            ids.append(torch.full((pad,), self.pad_token_id, dtype=torch.long))
            labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
            positions.append(torch.arange(pad, dtype=torch.long))
            seq_lengths.append(pad)
        cu = torch.zeros(len(seq_lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seq_lengths, dtype=torch.int32), 0)
        longest = max(seq_lengths)
        return {
            "input_ids": torch.cat(ids).unsqueeze(0),
            "labels": torch.cat(labels).unsqueeze(0),
            "position_ids": torch.cat(positions).unsqueeze(0),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            "num_tokens": real,
            "num_documents": len(doc_lengths),
        }


def model_inputs(batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """The model-input part of a packed batch, tensors moved to ``device`` (non-blocking)."""
    out: dict[str, Any] = {}
    for key in MODEL_INPUT_KEYS:
        value = batch[key]
        if isinstance(value, torch.Tensor) and device is not None:
            value = value.to(device, non_blocking=True)
        out[key] = value
    return out
