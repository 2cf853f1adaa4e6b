"""Document-isolated attention for packed micro-batches, registered with transformers.

A packed micro-batch (:mod:`kubetune.trainer.packing`) is one row holding many documents; each
token may attend only to earlier tokens *of its own document*. This module provides that as a
transformers attention implementation named ``"kubetune_packed"``:

* on CUDA with bf16/fp16 it calls FlashAttention's variable-length kernel through
  ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), driven by the ``cu_seq_lens_q`` /
  ``max_length_q`` boundaries the collator produces: no mask is materialised, and the cost of
  attention is the sum of per-document costs; when every document of the pack has the same length
  (fixed-length chunks) the pack is an ordinary batch and goes to cuDNN's fused attention instead;
* elsewhere (CPU, fp32, older torch, dropout) it builds the block-diagonal causal mask from the same
  boundaries and calls ``scaled_dot_product_attention``: exact, meant for tests and small runs;
* without boundaries (an ordinary, unpacked call such as generation) it is transformers' own SDPA.

No attention mask is created by the model for this implementation (transformers skips mask creation
for implementations it does not know), which also avoids a device sync per forward in transformers'
packed-sequence detection. Unpacked right-padded batches stay correct under the causal rule; left
padding is not supported here (use ``"sdpa"`` for that).

Who calls it: the trainer's model loading calls :func:`enable_packed_attention` on the model (or
passes ``attn_implementation=attn_implementation_for(device)`` to ``from_pretrained``/``from_config``);
``bench/`` does the same. :func:`kubetune.trainer.kernels.causal_lm_loss` forwards the packed keys.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "kubetune_packed"
# KUBETUNE_UNIFORM_CUDNN=0 keeps equal-length packs on the varlen kernel (for A/B measurements).
_UNIFORM_FAST_PATH = os.environ.get("KUBETUNE_UNIFORM_CUDNN", "1") != "0"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - depends on the installed torch
    _varlen_attn = None
    _VARLEN_PARAMS = frozenset()


def varlen_available(tensor: torch.Tensor) -> bool:
    """Whether the flash variable-length kernel can run on ``tensor`` (CUDA, half precision)."""
    return (
        _varlen_attn is not None
        and tensor.is_cuda
        and tensor.dtype in (torch.bfloat16, torch.float16)
    )


def register_packed_attention() -> str:
    """Register ``"kubetune_packed"`` with transformers' AttentionInterface (idempotent); return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    return PACKED_ATTENTION


def attn_implementation_for(device: torch.device | str | None = None) -> str:
    """The ``attn_implementation`` to load models with for packed training on ``device``.

    Always the packed implementation: it picks the flash kernel or the exact SDPA fallback per call,
    from the tensors it sees. ``device`` is accepted so callers need not care.
    """
    del device
    return register_packed_attention()


def enable_packed_attention(model: Any) -> Any:
    """Switch an already built transformers model (or a PEFT wrapper of one) to packed attention."""
    name = register_packed_attention()
    base = model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:  # PeftModel
        base = base.get_base_model()
    try:
        base.set_attn_implementation(name)
    except (AttributeError, ValueError, KeyError):
        base.config._attn_implementation = name
    return model


def document_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[total, total]`` mask: ``True`` where query i may see key j (same document, j <= i)."""
    pos = torch.arange(total, device=device)
    boundaries = cu_seqlens.to(device=device, dtype=torch.long)[1:]
    doc = torch.searchsorted(boundaries, pos, right=True)
    return (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])


#: KUBETUNE_COMPILE_LENGTH=traced (kubetune.trainer.compiling): trace the varlen call into the compiled
#: layers (it is a custom op with a fake and autograd in torch >= 2.10) instead of breaking the graph there.
_TRACE_VARLEN = False


def trace_varlen(on: bool = True) -> None:
    """Trace the flash varlen call into compiled graphs (``on``) or keep it out of them (the default)."""
    global _TRACE_VARLEN
    _TRACE_VARLEN = on


def _host_int(value: Any) -> Any:
    # A symbolic int (traced with a dynamic length) stays symbolic: int() would specialise on it.
    return value if isinstance(value, torch.SymInt) else int(value)


def _flash_varlen_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> torch.Tensor:
    # [T, H, D] in and out. Kept out of torch.compile graphs: max_q changes every batch and would
    # force recompiles; eager launch of one kernel per layer costs nothing measurable.
    kwargs: dict[str, Any] = {}
    head_dim = query.shape[-1]
    if "scale" in _VARLEN_PARAMS:
        kwargs["scale"] = scale
    elif not math.isclose(scale, head_dim**-0.5):
        query = query * (scale * math.sqrt(head_dim))
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.11: causal is window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.10
        kwargs["is_causal"] = True
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    return _varlen_attn(
        query, key, value, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        _host_int(max_q), _host_int(max_k), **kwargs,
    )


_flash_varlen = torch.compiler.disable(_flash_varlen_call)


# The backends the equal-length path may use; tests put SDPA's MATH here to run the same path on CPU.
_UNIFORM_BACKENDS: list[Any] | None = None


@torch.compiler.disable
def _uniform_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_docs: int, length: int, scale: float
) -> torch.Tensor | None:
    # Every document has the same length (fixed-length data, e.g. continued pre-training chunks):
    # the stream is a plain [n_docs, length] batch, and cuDNN's fused attention runs it ~1.8x faster
    # than the varlen flash kernel on Hopper (bench/gpu_check.py). None if cuDNN cannot take it.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, heads, total, head_dim = query.shape

    def per_doc(t: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [n, H, L, D] (BSHD strides)
        return t.transpose(1, 2).reshape(n_docs, length, t.shape[1], head_dim).transpose(1, 2)

    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION] if _UNIFORM_BACKENDS is None else _UNIFORM_BACKENDS):
            out = F.scaled_dot_product_attention(
                per_doc(query), per_doc(key), per_doc(value), is_causal=True, scale=scale,
                enable_gqa=key.shape[1] != heads,
            )
    except RuntimeError:
        return None
    return out.transpose(1, 2).reshape(1, total, heads, head_dim)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``[B, Hq, S, D]``, ``key``/``value`` ``[B, Hkv, S, D]``.

    Returns ``([B, S, Hq, D], None)`` like transformers' SDPA. With ``cu_seq_lens_q`` the ``B*S``
    tokens are one stream of documents delimited by it.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu_seq_lens_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    batch, heads, seq, head_dim = query.shape
    scale = head_dim**-0.5 if scaling is None else scaling
    total = batch * seq
    if varlen_available(query) and (dropout == 0.0 or not module.training):
        if max_length_q is None:
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        max_length_k = max_length_q if max_length_k is None else max_length_k
        n_docs = cu_seq_lens_q.shape[0] - 1
        # All documents equally long iff n_docs * longest == tokens (the boundaries cover the stream);
        # decided from shapes and host ints, so no device sync.
        # Traced (a symbolic, possibly unbacked, length): no comparison of the length to guard on.
        if not _TRACE_VARLEN and batch == 1 and max_length_k == max_length_q and n_docs * max_length_q == total and _UNIFORM_FAST_PATH:
            out = _uniform_sdpa(query, key, value, n_docs, max_length_q, scale)
            if out is not None:
                return out, None
        q = query.transpose(1, 2).reshape(total, heads, head_dim)
        k = key.transpose(1, 2).reshape(total, key.shape[1], head_dim)
        v = value.transpose(1, 2).reshape(total, value.shape[1], head_dim)
        flash = _flash_varlen_call if _TRACE_VARLEN else _flash_varlen
        out = flash(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale)
        return out.view(batch, seq, heads, head_dim), None
    # Exact fallback: one row, block-diagonal causal mask.
    q = query.transpose(0, 1).reshape(1, heads, total, head_dim)
    k = key.transpose(0, 1).reshape(1, key.shape[1], total, head_dim)
    v = value.transpose(0, 1).reshape(1, value.shape[1], total, head_dim)
    mask = document_mask(cu_seq_lens_q, total, query.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[None, None], dropout_p=dropout if module.training else 0.0,
        scale=scale, enable_gqa=k.shape[1] != heads,
    )
    out = out.reshape(heads, batch, seq, head_dim).permute(1, 2, 0, 3)
    return out, None
