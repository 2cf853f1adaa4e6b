"""Loss kernels: causal-LM cross-entropy without materialising the full logits.

With a 128k vocabulary a 16k-token micro-batch has logits of 16k x 128k: 4 GiB in bf16 and twice
that once upcast to fp32 for the softmax, plus the same again for their gradient. Fusing the
``lm_head`` projection with the cross-entropy avoids all of it:

* on CUDA, when ``liger_kernel`` is importable, Liger's fused linear cross-entropy (Triton) is used;
* otherwise :class:`ChunkedLinearCrossEntropy`, a pure-torch version of the same idea: the tokens
  are processed in chunks, each chunk's logits live only inside the forward, and the gradients for
  the hidden states and the weight are computed right there (so backward is a scale-and-return).

:func:`causal_lm_loss` runs a transformers causal LM (plain or PEFT-wrapped) up to its last hidden
state and applies the fused loss with HF's label convention (labels aligned with ``input_ids``,
shifted by one inside). The mean is over target tokens (labels != -100) of the micro-batch.

Who calls it: the trainer's training step (``loss = causal_lm_loss(model, **model_inputs(batch))``,
then ``engine.backward(loss)``), and ``bench/``. :class:`CausalLMLoss` wraps the same call as an
``nn.Module`` for engines that want to own the forward (``deepspeed.initialize(model=CausalLMLoss(m))``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_BACKENDS = ("auto", "liger", "chunked", "torch")

try:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as _liger_flce
except Exception:  # pragma: no cover - optional GPU dependency (ImportError, or triton missing)
    _liger_flce = None

# Liger sizes its token chunks so that one chunk's logits hold about chunk_mem_const x (tokens x
# hidden) values; its own default, 1, gives 512-token chunks for a 16k-token micro-batch and a 128k
# vocabulary: 32 chunks, each adding its [V, 512] x [512, d] product into the bf16 weight gradient,
# which reads and writes the whole 128k x d gradient 32 times (the H100 profile of 2026-12-06: 17 ms
# of such products per step for ~9 ms of arithmetic at peak). The trainer asks for 8: 2,048-token
# chunks (a 0.5 GiB logits buffer there instead of 128 MiB). Measured on an H100 (2026-12-07,
# bench/README.md): the loss alone 47.3 -> 40.2 ms fwd+bwd (bench/gpu_check.py `loss`, extra peak
# 1.23 -> 1.59 GiB), the fixed-length trainer step +2.8% (63,955 -> 65,749 tok/s), peak memory of the
# whole step unchanged (31.3 GiB). KUBETUNE_LOSS_CHUNK_MEM=N sets another (1 = Liger's own). Liger
# without the argument (before 0.8) gets its default.
LIGER_CHUNK_MEM = int(os.environ.get("KUBETUNE_LOSS_CHUNK_MEM", "8"))


def _liger_kwargs(fn: Any) -> dict[str, int]:
    import inspect

    if fn is None or "chunk_mem_const" not in inspect.signature(fn).parameters:
        return {}
    return {"chunk_mem_const": LIGER_CHUNK_MEM}


def liger_available() -> bool:
    return _liger_flce is not None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target``, chunk by chunk.

    Logits are computed in the weight's dtype, softmax in fp32. Gradients are formed in forward;
    weight/bias gradients are accumulated in fp32 and cast back to the parameter dtype.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
    ) -> torch.Tensor:
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        n_target = (target != ignore_index).sum()
        denom = n_target.clamp(min=1).to(acc)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = target[start : start + chunk_size]
            logits = F.linear(h, weight, bias).to(acc)
            valid = t != ignore_index
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, safe_t[:, None]).squeeze(-1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if need_h or need_w or need_b:
                # d loss / d logits = (softmax - onehot) / n_target, zero on ignored rows
                grad = torch.exp(logits - lse[:, None])
                grad.scatter_add_(-1, safe_t[:, None], torch.full_like(picked[:, None], -1.0))
                grad *= (valid.to(acc) / denom)[:, None]
                g = grad.to(weight.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = g @ weight
                if need_w:
                    grad_w += g.t() @ h
                if need_b:
                    grad_b += grad.sum(0)
            del logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / denom

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out
        gh = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * scale).to(w_dtype)
        gb = None if grad_b is None else (grad_b * scale).to(b_dtype)
        return gh, gw, gb, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [N, d] @ weight [V, d].T`` against ``target [N]``.

    ``backend``: ``"auto"`` (Liger on CUDA when importable, else chunked), ``"liger"``,
    ``"chunked"``, or ``"torch"`` (plain logits + ``F.cross_entropy``, the reference).
    The environment variable ``KUBETUNE_LOSS_BACKEND`` overrides ``"auto"``.
    """
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(LOSS_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("KUBETUNE_LOSS_BACKEND", "auto")
        if backend == "auto":
            backend = "liger" if hidden.is_cuda and _liger_flce is not None else "chunked"
    if backend == "liger":
        if _liger_flce is None:
            raise RuntimeError("backend 'liger' asked for, but liger_kernel is not importable")
        return _liger_flce(hidden, weight, target, bias=bias, ignore_index=ignore_index, **_liger_kwargs(_liger_flce))
    if backend == "torch":
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, chunk_size)


def _decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"model: {type(model).__name__} has no decoder/lm_head; causal_lm_loss needs a causal LM")
    return decoder, head


def causal_lm_loss(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    backend: str = "auto",
    **model_kwargs: Any,
) -> torch.Tensor:
    """Next-token loss of a causal LM on one (packed or padded) micro-batch, without full logits.

    ``labels`` follow HF's convention (same positions as ``input_ids``, -100 = no loss; the shift
    happens here). ``model_kwargs`` go to the decoder: ``position_ids`` and the packed-attention
    keys from :mod:`kubetune.trainer.packing`, or ``attention_mask`` for padded batches.
    """
    decoder, head = _decoder_and_head(model)
    out = decoder(input_ids=input_ids, use_cache=False, **model_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    bias = getattr(head, "bias", None)
    head_params = [p for p in (head.weight, bias) if p is not None]
    if not any(hasattr(p, "ds_id") for p in head_params):
        return linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1), bias, backend=backend,
        )
    # ZeRO-3 partitions the head's weight and gathers it only around the head's own forward and
    # backward (module hooks). So the fused loss runs *as* the head's forward here: the hooks gather
    # the weight for it, and gather it again when its gradient arrives in backward. Plain logits
    # ("torch") are replaced by the chunked kernel, which never holds them all.
    if backend == "torch" or (backend == "auto" and os.environ.get("KUBETUNE_LOSS_BACKEND") == "torch"):
        backend = "chunked"

    def fused_forward(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, head.weight, target, getattr(head, "bias", None), backend=backend)

    head.forward = fused_forward
    try:
        return head(hidden.reshape(-1, hidden.shape[-1]), shifted.reshape(-1))
    finally:
        del head.forward


class CausalLMLoss(torch.nn.Module):
    """``nn.Module`` whose forward is :func:`causal_lm_loss` on the wrapped model."""

    def __init__(self, model: torch.nn.Module, backend: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.backend = backend

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, labels, backend=self.backend, **model_kwargs)
