"""GPU-side correctness and speed check of the packed-attention and loss kernels (run before timing).

    python -m bench.gpu_check [uniform|attention|loss ...]

Compares, on random bf16 data: the flash varlen path of ``kubetune_packed`` attention against its
exact block-mask SDPA fallback (outputs and gradients), and the fused loss backends (Liger, chunked)
against plain logits + cross-entropy at the Llama-3.2-1B vocabulary, with their time and memory.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import bench  # noqa: F401  (maps kubetune.* onto this checkout when not installed)
from kubetune.trainer import attention, kernels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


class _Mod(torch.nn.Module):
    pass


def check_attention() -> None:
    print("varlen_attn params:", sorted(attention._VARLEN_PARAMS))
    torch.manual_seed(0)
    # 8k tokens: the fp32 block-mask reference needs heads x T^2 floats (16 GiB here, 64 GiB at 16k)
    lengths = [300, 1000, 17, 2048, 555, 8192 - 300 - 1000 - 17 - 2048 - 555]
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(1, 32, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, total, 32, 64, device="cuda", dtype=torch.bfloat16)
    m = _Mod().train()
    out, _ = attention.packed_attention_forward(m, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                max_length_q=max(lengths), max_length_k=max(lengths))
    grads = torch.autograd.grad(out, [q, k, v], g)
    # reference: same math through the fallback, in fp32
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = attention.packed_attention_forward(m, qf, kf, vf, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    ref_grads = torch.autograd.grad(ref, [qf, kf, vf], g.float())
    print(f"attention varlen vs fp32 block-mask: out rel {rel(out, ref):.2e}, "
          + ", ".join(f"d{n} rel {rel(a, b):.2e}" for n, a, b in zip("qkv", grads, ref_grads)))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        out, _ = attention.packed_attention_forward(m, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                    max_length_q=max(lengths), max_length_k=max(lengths))
        torch.autograd.grad(out, [q, k, v], g)
    torch.cuda.synchronize()
    print(f"attention varlen fwd+bwd, 8k tokens: {(time.perf_counter() - t) / 10 * 1e3:.2f} ms")


def check_loss() -> None:
    torch.manual_seed(0)
    n, d, vocab = 16384, 2048, 128256
    h = (torch.randn(n, d, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
    w = (torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (n,), device="cuda")
    t[::7] = -100
    results = {}
    # Liger at several chunk sizes (chunk_mem_const: its default 1, and the trainer's, kernels.LIGER_CHUNK_MEM)
    variants = [("torch", {}), ("chunked", {})]
    if kernels.liger_available():
        if kernels._liger_kwargs(kernels._liger_flce):
            variants += [(f"liger-{c}", {"chunk_mem_const": c}) for c in (1, 4, 8, 16)]
        else:
            variants += [("liger", {})]
    else:
        print("liger not importable")
    for name, extra in variants:
        backend = name.split("-")[0]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(4):
            if i == 1:
                torch.cuda.synchronize()
                start = time.perf_counter()
            if extra:
                loss = kernels._liger_flce(h, w, t, ignore_index=-100, **extra)
            else:
                loss = kernels.linear_cross_entropy(h, w, t, backend=backend)
            gh, gw = torch.autograd.grad(loss, [h, w])
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 3 * 1e3
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        results[name] = (loss.detach(), gh, gw)
        print(f"loss {name:8s}: {loss.item():.5f}  {ms:7.2f} ms fwd+bwd  extra peak {peak:.2f} GiB")
    ref = results["torch"]
    for backend, (lo, gh, gw) in results.items():
        print(f"  {backend} vs torch: loss rel {rel(lo, ref[0]):.1e}, dh rel {rel(gh, ref[1]):.1e}, dW rel {rel(gw, ref[2]):.1e}")


def check_uniform_attention() -> None:
    """Fixed-length case (8 documents of 2048): varlen flash vs SDPA backends on [8, H, 2048, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    b, s = 8, 2048
    q = torch.randn(b, 32, s, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, 8, s, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, 8, s, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(b, 32, s, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32, device="cuda")

    def varlen():
        out = attention._flash_varlen(q.transpose(1, 2).reshape(b * s, 32, 64), k.transpose(1, 2).reshape(b * s, 8, 64),
                                      v.transpose(1, 2).reshape(b * s, 8, 64), cu, cu, s, s, 0.125)
        return out.view(b, s, 32, 64).transpose(1, 2)

    def sdpa(backend, gqa):
        def f():
            kk, vv = (k, v) if gqa else (k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        return f

    ref = varlen()
    flat = [t.detach().transpose(1, 2).reshape(1, b * s, t.shape[1], 64).transpose(1, 2) for t in (q, k, v)]
    packed, _ = attention.packed_attention_forward(_Mod(), *flat, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                   max_length_q=s, max_length_k=s)
    print(f"uniform pack through kubetune_packed (cuDNN path) vs varlen: rel "
          f"{rel(packed.reshape(b, s, 32, 64).transpose(1, 2), ref):.1e}")
    variants = {"varlen flash": varlen}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in (True, False):
            variants[f"{name} gqa={gqa}"] = sdpa(backend, gqa)
    for name, f in variants.items():
        try:
            out = f()
            torch.autograd.grad(out, [q, k, v], g.transpose(1, 2).transpose(1, 2))
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                torch.autograd.grad(f(), [q, k, v], g)
            torch.cuda.synchronize()
            print(f"uniform 8x2048 {name:26s}: {(time.perf_counter() - t) / 10 * 1e3:6.2f} ms fwd+bwd, rel {rel(out, ref):.1e}")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"uniform 8x2048 {name:26s}: unavailable ({type(e).__name__}: {str(e)[:80]})")


if __name__ == "__main__":
    import sys

    print(torch.__version__, torch.cuda.get_device_name(0))
    parts = sys.argv[1:] or ["uniform", "attention", "loss"]  # e.g. `python -m bench.gpu_check loss`
    for part in parts:
        {"uniform": check_uniform_attention, "attention": check_attention, "loss": check_loss}[part]()
