"""The chunked fused linear cross-entropy gives the loss and gradients of plain logits + cross-entropy."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kubetune.trainer.kernels import linear_cross_entropy


@pytest.mark.parametrize("chunk_size", [7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_matches_reference(chunk_size, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    target = torch.randint(0, 40, (50,), generator=g)
    target[::3] = -100

    ref = F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=-100)
    ref_grads = torch.autograd.grad(2.5 * ref, [t for t in (hidden, weight, bias) if t is not None])
    got = linear_cross_entropy(hidden, weight, target, bias, backend="chunked", chunk_size=chunk_size)
    got_grads = torch.autograd.grad(2.5 * got, [t for t in (hidden, weight, bias) if t is not None])

    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_frozen_weight_gets_no_gradient_work():
    hidden = torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(10, 4)  # frozen head, as under LoRA
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (8,)), backend="chunked")
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert grad.shape == hidden.shape and torch.isfinite(grad).all()


def test_all_ignored_gives_zero_loss_not_nan():
    hidden = torch.randn(4, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(6, 4), torch.full((4,), -100), backend="chunked")
    assert loss.item() == 0.0


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend: must be one of auto, liger, chunked, torch, got 'triton'"):
        linear_cross_entropy(torch.randn(2, 2), torch.randn(3, 2), torch.zeros(2, dtype=torch.long), backend="triton")


def test_liger_chunk_size_is_passed_where_liger_takes_it(monkeypatch):
    # The trainer asks Liger for chunk_mem_const 8 (2,048-token chunks for a 128k vocabulary and a
    # 2048 hidden size; Liger's own 1 gives 512), KUBETUNE_LOSS_CHUNK_MEM sets another. Liger without
    # the argument (before 0.8) is called as before. The GPU numbers of each chunk size against plain
    # logits are bench/gpu_check.py's `loss` part.
    from kubetune.trainer import kernels

    calls = []

    def new_liger(hidden, weight, target, bias=None, ignore_index=-100, chunk_mem_const=1):
        calls.append(chunk_mem_const)
        return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index)

    def old_liger(hidden, weight, target, bias=None, ignore_index=-100):
        calls.append(None)
        return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index)

    args = (torch.randn(6, 4), torch.randn(10, 4), torch.randint(0, 10, (6,)))
    default = int(os.environ.get("KUBETUNE_LOSS_CHUNK_MEM", "8"))
    assert kernels.LIGER_CHUNK_MEM == default
    for fake in (new_liger, old_liger):
        monkeypatch.setattr(kernels, "_liger_flce", fake)
        linear_cross_entropy(*args, backend="liger")
    monkeypatch.setattr(kernels, "_liger_flce", new_liger)
    monkeypatch.setattr(kernels, "LIGER_CHUNK_MEM", 1)  # KUBETUNE_LOSS_CHUNK_MEM=1: Liger's own
    linear_cross_entropy(*args, backend="liger")
    assert calls == [default, None, 1]
