"""KUBETUNE_COMPILE_LENGTH: the compiled layers under a packing budget (packs of varying length).

On a GPU, Inductor guards on ranges of the dynamic pack length and recompiles the layers mid-run
(bench/README.md, "Packing budget"). CPU Inductor has a threshold of its own (4,096 tokens, from its
reduction code generation), so the same recompile is reproduced here with a tiny Llama and packs on
both sides of it; the GPU's thresholds (2,560, 4,096) are not. The flash varlen kernel is CUDA-only:
a CPU custom op with the same signature, fake and autograd stands in for it (exact block-diagonal
attention), so the graph breaks, or is traced, where it does on the GPU.
"""

from __future__ import annotations

import random
import types
from typing import Any

import pytest
import torch

from kubetune.trainer import compiling


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact block-diagonal causal attention, one document at a time, as the flash varlen kernel
    computes it: O(sum of squared document lengths), not one [total, total] mask (a 5,376-token
    pack's mask and scores cost ~2 s a pack on CPU; its documents' ~0.1 s)."""
    heads = q.shape[1]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], 1)
        v = v.repeat_interleave(heads // v.shape[1], 1)
    bounds = [int(b) for b in cu.tolist()]
    if bounds[-1] < q.shape[0]:  # tokens past the last boundary are a document of their own
        bounds.append(q.shape[0])
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=True, scale=scale).transpose(0, 1)
        for start, end in zip(bounds, bounds[1:])
    ]
    return torch.cat(out).contiguous()


@torch.library.custom_op("kubetune_test::varlen_attn", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               max_q: int, max_k: int, scale: float) -> torch.Tensor:
    return _math_attention(q, k, v, cu_q, scale)


@_varlen_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)


@torch.library.custom_op("kubetune_test::varlen_attn_backward", mutates_args=())
def _varlen_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, vjp = torch.func.vjp(lambda a, b, c: _math_attention(a, b, c, cu_q, scale), q, k, v)
    dq, dk, dv = vjp(grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_varlen_backward_op.register_fake
def _(grad, q, k, v, cu_q, scale):  # type: ignore[no-untyped-def]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.scale = inputs[7]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    q, k, v, cu_q = ctx.saved_tensors
    return (*_varlen_backward_op(grad.contiguous(), q, k, v, cu_q, ctx.scale), None, None, None, None, None)


_varlen_op.register_autograd(_backward, setup_context=_setup_context)


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):  # type: ignore[no-untyped-def]
    return _varlen_op(q, k, v, cu_q, cu_k, max_q, max_k, kwargs["scale"])


@pytest.fixture
def gpu_attention(monkeypatch):
    """The trainer's packed attention taking its GPU path (flash varlen) on CPU, through the stand-in op."""
    from kubetune.trainer import attention

    monkeypatch.setattr(attention, "varlen_available", lambda tensor: True)
    monkeypatch.setattr(attention, "_varlen_attn", _fake_varlen)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", frozenset({"scale", "window_size"}))
    monkeypatch.setattr(attention, "_TRACE_VARLEN", False)
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    # prepare_layers sets process-wide options: restored after the test
    with dynamo_config.patch(automatic_dynamic_shapes_mark_as="dynamic", recompile_limit=dynamo_config.recompile_limit):
        yield attention
    torch._dynamo.reset()


def _packs(lengths_per_pack: list[tuple[int, int]], buckets: list[int] | None = None,
           device: str | None = None) -> list[dict[str, Any]]:
    from kubetune.trainer.packing import PackedCollator, model_inputs

    rng = random.Random(0)
    packs = []
    for lo, hi in lengths_per_pack:
        docs = [{"input_ids": [rng.randrange(96) for _ in range(rng.randint(lo, hi))]} for _ in range(8)]
        if buckets is None:
            collate = PackedCollator(None, pad_to_multiple_of=compiling.PAD_MULTIPLE)
        else:
            collate = PackedCollator(compiling.bucket_for(sum(len(d["input_ids"]) for d in docs), buckets))
        packs.append(model_inputs(collate(docs), device))
    return packs


def _model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.trainer.attention import enable_packed_attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
    )).train()
    return enable_packed_attention(model)


def _train(model: torch.nn.Module, packs: list[dict[str, Any]]) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    from kubetune.trainer.kernels import causal_lm_loss

    out = []
    for pack in packs:
        model.zero_grad()
        loss = causal_lm_loss(model, backend="chunked", **pack)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


def _layer_cache_entries() -> int:
    """Graphs compiled for the decoder layer's own frame (its ``forward``, decorators unwrapped)."""
    import inspect

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return len(_debug_get_cache_entry_list(inspect.unwrap(LlamaDecoderLayer.forward).__code__))


# Packs of 8 documents, 768 to 5,632 tokens, crossing CPU Inductor's 4,096 threshold three times.
SPANS = [(20, 150), (20, 700), (500, 900), (20, 700), (20, 150), (500, 900), (20, 150), (20, 700)]
# Buckets: packs of two buckets (768 and 6,144 tokens, either side of 4,096), each met twice.
BUCKET_SPANS = [(20, 150), (500, 900), (20, 150), (500, 900)]


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["dynamic", "unbacked", "unbacked+traced"])
def test_layers_under_a_packing_budget_recompile_only_without_an_unbacked_length(gpu_attention, monkeypatch, setting):
    """As is, the layer recompiles when a pack crosses a threshold Inductor guarded on; with the length
    marked unbacked the layer's frame compiles once, and with the varlen call traced too the whole layer
    is one graph for every length. Loss and gradients equal eager's for every pack."""
    import torch._dynamo.utils
    from kubetune.trainer.training import _compile

    packs = _packs(SPANS)
    lengths = [p["input_ids"].shape[1] for p in packs]
    assert min(lengths) < 4096 < max(lengths)
    model = _model()
    eager = _train(model, packs)

    monkeypatch.setenv(compiling.ENV, setting)
    modes = compiling.length_modes()
    torch._dynamo.utils.counters.clear()
    _compile(types.SimpleNamespace(module=model), dynamic=compiling.compile_dynamic(8, modes), length_modes=modes)
    compiled = _train(model, packs)

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if setting == "dynamic":
        assert _layer_cache_entries() == 2  # recompiled at the first pack above 4,096 tokens
    elif setting == "unbacked":
        assert _layer_cache_entries() == 1
        assert graphs > 1  # the graph breaks at the attention: resumed frames of their own
    else:  # no graph break: the layer is inlined into one compiled frame, one graph for all 8 lengths
        assert graphs == 1
    for (want_loss, want_grads), (loss, grads) in zip(eager, compiled):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_buckets_compile_one_static_graph_per_bucket_and_keep_the_loss(gpu_attention, monkeypatch):
    """KUBETUNE_COMPILE_LENGTH=buckets: packs padded to a bucket length compile statically, once per
    bucket met (a pack of a bucket already met compiles nothing); the padding (a document of its own,
    label-free) leaves loss and gradients as eager's on the unpadded-to-bucket pack."""
    from kubetune.trainer.training import _compile

    buckets = compiling.bucket_lengths(8192)
    packs = _packs(BUCKET_SPANS, buckets)
    met = {p["input_ids"].shape[1] for p in packs}
    assert met <= set(buckets) and 1 < len(met) < len(packs) and min(met) < 4096 < max(met)
    model = _model()
    eager = _train(model, _packs(BUCKET_SPANS))

    monkeypatch.setenv(compiling.ENV, "buckets")
    modes = compiling.length_modes()
    _compile(types.SimpleNamespace(module=model), dynamic=compiling.compile_dynamic(8, modes), length_modes=modes,
             buckets=len(buckets))
    compiled = _train(model, packs)
    assert _layer_cache_entries() == len(met)
    for (want_loss, want_grads), (loss, grads) in zip(eager, compiled):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bucket_lengths_are_256_multiples_about_a_quarter_apart_up_to_the_budget():
    buckets = compiling.bucket_lengths(16384)
    assert buckets[0] == 256 and buckets[-1] == 16384
    assert all(b % 256 == 0 for b in buckets)
    assert all(b2 > b1 for b1, b2 in zip(buckets, buckets[1:]))
    assert all(b2 <= max(b1 + 256, 1.25 * b1 + 256) for b1, b2 in zip(buckets, buckets[1:]))
    assert compiling.bucket_lengths(1000) == [256, 512, 768, 1000]
    assert compiling.bucket_for(257, buckets) == 512
    assert compiling.bucket_for(16384, buckets) == 16384
    with pytest.raises(ValueError, match="exceeds the token budget 16384"):
        compiling.bucket_for(16385, buckets)
    with pytest.raises(ValueError, match="budget: must be > 0"):
        compiling.bucket_lengths(0)


def test_padding_waste_counts_the_padded_tokens():
    assert compiling.padding_waste([256, 512], None) == 0.0
    assert compiling.padding_waste([300], None) == pytest.approx(1 - 300 / 512)
    assert compiling.padding_waste([1100], [256, 512, 1024, 1280]) == pytest.approx(1 - 1100 / 1280)


def test_length_modes_are_read_from_the_environment_and_bad_ones_refused():
    assert compiling.length_modes({}) == frozenset()
    assert compiling.length_modes({compiling.ENV: "dynamic"}) == frozenset()
    assert compiling.length_modes({compiling.ENV: "unbacked+traced+hints"}) == {"unbacked", "traced", "hints"}
    with pytest.raises(ValueError, match="KUBETUNE_COMPILE_LENGTH: must be one or more of .* got 'fast'"):
        compiling.length_modes({compiling.ENV: "fast"})
    with pytest.raises(ValueError, match="KUBETUNE_COMPILE_LENGTH: .*choose one"):
        compiling.length_modes({compiling.ENV: "buckets+unbacked"})
    assert compiling.compile_dynamic(None, frozenset({"buckets"})) is None  # no budget: torch's default
    assert compiling.compile_dynamic(8, frozenset()) is True
    assert compiling.compile_dynamic(8, frozenset({"unbacked"})) is True
    assert compiling.compile_dynamic(8, frozenset({"buckets"})) is False


def test_hints_set_the_inductor_options_that_guard_on_the_length(monkeypatch):
    import torch._inductor.config as inductor_config

    for name, _ in compiling.HINTS:
        monkeypatch.setattr(inductor_config, name, getattr(inductor_config, name))
    assert inductor_config.split_reductions is True and inductor_config.assume_32bit_indexing is False
    compiling.prepare_layers(frozenset({"hints"}))
    assert inductor_config.split_reductions is False and inductor_config.assume_32bit_indexing is True


def test_the_trainer_pads_budget_packs_to_buckets_only_when_asked():
    from kubetune.trainer.training import Trainer

    training = types.SimpleNamespace(packing=True, packing_max_examples=8, micro_batch_size=4, max_seq_length=256)
    owner = types.SimpleNamespace(spec=types.SimpleNamespace(training=training),
                                  tokenizer=types.SimpleNamespace(pad_token_id=0), buckets=None)
    items = [{"input_ids": list(range(1, 101)), "_index": i} for i in range(3)]  # 300 tokens
    assert Trainer._collate(owner, items)["input_ids"].shape == (1, 512)  # a multiple of 256
    owner.buckets = [256, 384, 1024]
    batch = Trainer._collate(owner, items)
    assert batch["input_ids"].shape == (1, 384) and batch["num_tokens"] == 300
