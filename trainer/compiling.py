"""How the compiled decoder layers take packs whose length varies (``training.packingMaxExamples``).

A pack capped at N documents is shorter than the token budget and its length changes every step.
The layers are compiled with ``dynamic=True`` (one graph for every length), but Inductor, compiling
that graph for a GPU, still compares the symbolic length with thresholds (fusion, split reductions,
32-bit indexing) and guards on the outcome (``4096 <= hidden_states.size()[1] <= 2147483647``, then
``2560 <= ... <= 4095`` on an H100), so the first pack of each new range recompiles the layer and the
frame resumed after the attention mid-run (bench/README.md, "Packing budget"). Ways around it,
chosen with ``KUBETUNE_COMPILE_LENGTH`` (``+`` joins several; unset or ``dynamic``: today's
behaviour); they apply only to runs with ``training.packingMaxExamples``. All are opt-in until a GPU
call decides between them:

* ``unbacked``: the length has no example value the compiler may guard on. Each compiled layer's
  inputs are marked with ``torch._dynamo.decorators.mark_unbacked`` on their length dimension before
  the compiled call, and dynamo's ``automatic_dynamic_shapes_mark_as = "unbacked"`` turns the length
  of the frames resumed after the attention's graph break (which no wrapper sees) unbacked at their
  first change. Inductor picks an unbacked length's kernels from a fixed size hint and cannot guard on
  it. On CPU (a tiny Llama, 12 packs of 768-5,632 tokens, CPU Inductor guarding at 4,096) the layer's
  first frame compiled once and the frame resumed after the attention twice (then unbacked).
* ``traced``: the flash varlen call is traced into the layer graphs (``torch_attn::_varlen_attn`` is a
  custom op with a fake and autograd since torch 2.10) instead of breaking the graph there, so a layer is
  one frame and ``unbacked`` reaches all of it: ``unbacked+traced`` compiles one graph for every length
  (a tiny Llama on CPU, 12 packs of 768-5,632 tokens: 1 graph, no recompile). The equal-length cuDNN
  path is not taken then (it compares the length with the documents').
* ``buckets``: packs are padded to one of a few fixed lengths (:func:`bucket_lengths`: multiples of
  256 about 1.25x apart, up to the token budget) and the layers compile statically, one graph per
  bucket met (each with no symbolic length to guard on); costs padding (:func:`padding_waste`).
* ``hints``: keep the dynamic graph, turn off two Inductor decisions that may guard on the length
  (which one emits the GPU's guards is not pinned down): ``split_reductions`` off,
  ``assume_32bit_indexing`` on (one guard, length x width < 2**31, that every pack within the budget
  passes; with ``unbacked`` it keeps 32-bit indexing, which an unbacked length otherwise loses).
  Both names exist in torch 2.11 and 2.13; a name the installed torch lacks is skipped with a log line.

Who calls it: :func:`kubetune.trainer.training._compile` (``compile_dynamic``, ``prepare_layers``,
``wrap_layer``) and the trainer's collate (``bucket_for``). Hand-written because torch has no
option for "never guard on this dimension" other than the unbacked marking done here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger("kubetune.trainer")

ENV = "KUBETUNE_COMPILE_LENGTH"
MODES = ("dynamic", "unbacked", "traced", "buckets", "hints")
#: Packs of a packing budget are padded to a multiple of this many tokens (without buckets).
PAD_MULTIPLE = 256
#: Bucket lengths grow by about this factor (then round up to PAD_MULTIPLE).
BUCKET_GROWTH = 1.25
#: Inductor settings of the ``hints`` mode (torch._inductor.config names, value).
HINTS = (("split_reductions", False), ("assume_32bit_indexing", True))


def length_modes(environ: Any = None) -> frozenset[str]:
    """The modes named by ``KUBETUNE_COMPILE_LENGTH`` (``+``-joined); empty for unset or ``dynamic``."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    modes = {m.strip() for m in raw.split("+") if m.strip()}
    bad = sorted(modes - set(MODES))
    if bad:
        raise ValueError(f"{ENV}: must be one or more of {', '.join(MODES)} joined by '+', got {raw!r}")
    if {"buckets", "unbacked"} <= modes:
        raise ValueError(f"{ENV}: buckets compile static lengths, unbacked a symbolic one; choose one, got {raw!r}")
    return frozenset(modes - {"dynamic"})


def compile_dynamic(max_examples: int | None, modes: frozenset[str]) -> bool | None:
    """``dynamic=`` for the layers' compile: True for varying pack lengths, False for buckets, else torch's."""
    if max_examples is None:
        return None
    return False if "buckets" in modes else True


def prepare_layers(modes: frozenset[str], buckets: int = 0) -> None:
    """Process-wide torch settings for ``modes``, before any graph is compiled."""
    if "unbacked" in modes:
        import torch._dynamo.config as dynamo_config

        dynamo_config.automatic_dynamic_shapes_mark_as = "unbacked"
    if "traced" in modes:
        from kubetune.trainer import attention

        attention.trace_varlen(True)
    if "hints" in modes:
        import torch._inductor.config as inductor_config

        for name, value in HINTS:
            if hasattr(inductor_config, name):
                setattr(inductor_config, name, value)
            else:
                log.info("torch._inductor.config.%s: not in torch %s; left out", name, torch.__version__)
    if "buckets" in modes and buckets:
        import torch._dynamo.config as dynamo_config

        # One static graph per bucket per frame (the layer, the frame resumed after the attention).
        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), buckets + 2))


def mark_length_unbacked(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Mark dimension 1 (the packed length) of a decoder layer's inputs unbacked.

    The hidden states ``[1, T, hidden]``, ``position_ids`` ``[1, T]`` and the rotary
    ``position_embeddings`` (cos, sin: ``[1, T, head_dim]``): every input whose dimension 1 is the
    pack's length, so the graph has one length symbol and no example value of it.
    """
    from torch._dynamo.decorators import mark_unbacked

    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return
    length = hidden.shape[1]
    candidates = [hidden, kwargs.get("position_ids")]
    embeddings = kwargs.get("position_embeddings")
    if isinstance(embeddings, (tuple, list)):
        candidates.extend(embeddings)
    for tensor in candidates:
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[1] == length:
            mark_unbacked(tensor, 1)


def wrap_layer(layer: torch.nn.Module) -> None:
    """Mark the length unbacked on every call of ``layer``'s compiled forward (after ``layer.compile``).

    The marking has to happen outside the compiled region (a forward pre-hook would be traced into
    it), so it wraps the callable ``nn.Module.compile`` installed.
    """
    compiled = getattr(layer, "_compiled_call_impl", None)
    if compiled is None:
        raise RuntimeError("wrap_layer: the layer is not compiled (call layer.compile first)")

    def call(*args: Any, **kwargs: Any) -> Any:
        mark_length_unbacked(args, kwargs)
        return compiled(*args, **kwargs)

    layer._compiled_call_impl = call


def bucket_lengths(budget: int, multiple: int = PAD_MULTIPLE, growth: float = BUCKET_GROWTH) -> list[int]:
    """Pack lengths of the ``buckets`` mode: multiples of ``multiple`` ~``growth``x apart, ending at ``budget``."""
    if budget <= 0:
        raise ValueError(f"budget: must be > 0, got {budget}")
    out: list[int] = []
    length = multiple
    while length < budget:
        out.append(length)
        length = max(length + multiple, -(-int(length * growth) // multiple) * multiple)
    out.append(budget)
    return out


def bucket_for(tokens: int, buckets: Sequence[int]) -> int:
    """The shortest bucket that holds ``tokens`` (packs never exceed the budget, the last bucket)."""
    for length in buckets:
        if tokens <= length:
            return length
    raise ValueError(f"tokens: a pack of {tokens} exceeds the token budget {buckets[-1]}")


def padding_waste(pack_tokens: Sequence[int], buckets: Sequence[int] | None, multiple: int = PAD_MULTIPLE) -> float:
    """Padding as a fraction of the padded tokens: to ``buckets``, or (None) to a multiple of ``multiple``."""
    if buckets is None:
        padded = [-(-n // multiple) * multiple for n in pack_tokens]
    else:
        padded = [bucket_for(n, buckets) for n in pack_tokens]
    return 1.0 - sum(pack_tokens) / sum(padded)
