"""One-pass Adam(W) over fp32 master weights: a Triton kernel for :mod:`kubetune.trainer.fused_engine`.

The fused engine's step used to be four passes over memory per parameter: the gradient hook
converted each bf16 gradient into an fp32 buffer, ``_foreach_norm`` read the buffers,
``torch._fused_adamw_`` read them again with the masters and moments, and ``_foreach_copy_`` wrote
the masters back into the bf16 weights (~44 bytes of traffic per parameter, plus 4 bytes per
parameter of fp32 gradient memory). :func:`adam_update` does the update in one pass: it reads the
gradient in its own dtype (the bf16 gradient autograd left in ``param.grad``, or the fp32
accumulation buffer under gradient accumulation), the fp32 master and moments, and writes the
master, the moments and the rounded low-precision weight (28 bytes per parameter for a bf16
gradient).

Hand-written because no library at hand offers it: torch's fused AdamW (and DeepSpeed's and apex's
multi-tensor Adam) take the gradient and the parameter in one dtype, so they either update the
bf16 weights themselves (losing the fp32 masters) or need the fp32 gradient copy this removes.

The math is ``torch._fused_adamw_``'s (and ``torch.optim.AdamW``'s) with its ``grad_scale`` and
``found_inf`` arguments: the gradient is divided by ``grad_scale`` (global-norm clipping), and a
non-zero ``found_inf`` leaves every tensor untouched. Those two and the step count are device
scalars read by the kernel, so the step needs no host sync. Called once per parameter tensor
(~150 launches for a 1B Llama, each far longer on the GPU than its launch on the host).
Only CUDA tensors; :func:`available` says whether Triton is importable here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine falls back to torch's kernels
    triton = None

BLOCK = 2048

if triton is not None:

    @triton.jit
    def _adam_kernel(weight_ptr, grad_ptr, master_ptr, avg_ptr, sq_ptr, step_ptr, scale_ptr, inf_ptr, n,
                     lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
                     DECOUPLED: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = (offsets < n) & (tl.load(inf_ptr) == 0.0)
        step = tl.load(step_ptr)
        scale = tl.load(scale_ptr)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32) / scale
        w = tl.load(master_ptr + offsets, mask=mask, other=0.0)
        m = tl.load(avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(sq_ptr + offsets, mask=mask, other=0.0)
        if DECOUPLED:
            w = w * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * w
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        bias1 = 1.0 - tl.exp2(step * log2_beta1)
        bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        w = w - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(master_ptr + offsets, w, mask=mask)
        tl.store(avg_ptr + offsets, m, mask=mask)
        tl.store(sq_ptr + offsets, v, mask=mask)
        tl.store(weight_ptr + offsets, w.to(weight_ptr.dtype.element_ty), mask=mask)


def _log2(beta: float) -> float:
    return -math.inf if beta == 0 else math.log2(beta)  # beta ** step = exp2(step * log2(beta)); 0 ** step = 0


def available(device: torch.device | None) -> bool:
    """Whether :func:`adam_update` can run on ``device`` (a CUDA device and Triton importable)."""
    return triton is not None and device is not None and device.type == "cuda"


def adam_update(weights: list[torch.Tensor], grads: list[torch.Tensor], masters: list[torch.Tensor],
                avgs: list[torch.Tensor], sqs: list[torch.Tensor], *, step: torch.Tensor, grad_scale: torch.Tensor,
                found_inf: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                decoupled: bool) -> None:
    """Adam(W) on each (weight, grad, master, exp_avg, exp_avg_sq), in place (see the module doc).

    ``step`` is the step count after this step's increment (as torch's fused kernels take it);
    ``grad_scale``, ``found_inf`` and ``step`` are fp32 device scalars. Masters and moments are
    fp32 and contiguous; the weight may be any float dtype and is written as the rounded master.
    """
    assert triton is not None
    common: dict[str, Any] = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                                  weight_decay=float(weight_decay), log2_beta1=_log2(beta1),
                                  log2_beta2=_log2(beta2), DECOUPLED=bool(decoupled), BLOCK=BLOCK)
    for weight, grad, master, avg, sq in zip(weights, grads, masters, avgs, sqs):
        n = weight.numel()
        if n == 0:
            continue
        if not grad.is_contiguous():
            grad = grad.contiguous()
        assert weight.is_contiguous() and master.is_contiguous() and avg.is_contiguous() and sq.is_contiguous()
        _adam_kernel[(triton.cdiv(n, BLOCK),)](weight, grad, master, avg, sq, step, grad_scale, found_inf, n,
                                               num_warps=8, **common)
