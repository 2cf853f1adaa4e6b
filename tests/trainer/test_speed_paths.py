"""The trainer's speed paths stay correct on CPU: ZeRO-3 with packing, the norm-based bf16 step skip.

The GPU speed work (issue 8) changed what runs by default: the fused loss reads ``lm_head.weight``
outside the head's forward (ZeRO-3 partitions it, so the loss gathers it), and bf16 ZeRO-1/2 steps
are skipped on a non-finite gradient norm instead of DeepSpeed's per-tensor overflow scan. These
tests run both on CPU with a tiny Llama.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from tests.support.tiny_models import manifest, write_dataset


def test_zero3_with_packing_trains_two_processes(tiny_model_dir, train_job, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl", "text")
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={
        "deepspeed.zeroStage": 3, "training.packing": True, "training.maxSteps": 3,
        "checkpointing.everySteps": None, "data.eval": None, "training.logEverySteps": 1,
    })
    run = train_job(job, tmp_path / "run", nproc=2)
    assert run.rc == 0, run.output
    log = run.log()
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[-1]["loss"] < log[0]["loss"]  # the gathered head weight got its gradient
    assert all(r["window_tokens"] > 0 and r["window_seconds"] > 0 for r in log)
    assert (run.output_dir / "config.json").exists()


def _bf16_engine(port: str):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.trainer.distributing import init_distributed
    from kubetune.trainer.engines import use_norm_overflow_check

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", port)
    init_distributed(False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": False},
        "zero_allow_untested_optimizer": True,
    })
    return engine, use_norm_overflow_check(engine)


def test_bf16_step_is_skipped_on_a_non_finite_gradient_norm():
    engine, applied = _bf16_engine("29617")
    assert applied
    ids = torch.randint(0, 64, (1, 16))
    before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}

    loss = engine(input_ids=ids, labels=ids).loss * float("nan")
    engine.backward(loss)
    engine.step()
    after_nan = {n: p.detach().float() for n, p in engine.module.named_parameters()}
    assert all(torch.equal(before[n], after_nan[n]) for n in before), "a NaN gradient reached the weights"

    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    moved = [n for n, p in engine.module.named_parameters() if not torch.equal(before[n], p.detach().float())]
    assert moved, "a finite step must still update the weights"
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


@pytest.mark.parametrize("stage", [0, 3])
def test_norm_check_is_not_applied_where_deepspeed_scans_differently(stage):
    import deepspeed

    from kubetune.trainer.engines import use_norm_overflow_check

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29618"}.items():
        os.environ.setdefault(key, value)
    from kubetune.trainer.distributing import init_distributed

    init_distributed(False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    assert use_norm_overflow_check(engine) is False


@pytest.mark.parametrize("setting", [None, "outputs", "torch"])  # None: the default
def test_compiled_layers_take_attention_gradients_without_copies(monkeypatch, setting):
    # The packed attention call stays out of the per-layer graphs, so q/k/v leave each layer's first
    # graph as transformers' [B, H, S, D] views and their gradients come back in that layout. With
    # torch 2.11's default guess (contiguous) AOTAutograd copied each one before the compiled
    # backward: 3 per layer (48 copies per step of a 16-layer model on an H100).
    # The trainer's compile makes it expect them laid out like the outputs (the default since an H100
    # A/B, KUBETUNE_COMPILE_TANGENTS=outputs); KUBETUNE_COMPILE_TANGENTS=torch leaves torch's guess,
    # here set to 2.11's, and the copies stay. Numerics are the same either way. Equal-length documents take
    # the cuDNN path on a GPU; SDPA's math backend stands in for it on CPU (same call and views);
    # aot_eager stands in for inductor (the copies are AOTAutograd's, before either).
    import torch._functorch.config as functorch_config
    from torch.nn.attention import SDPBackend
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.trainer import attention
    from kubetune.trainer.kernels import causal_lm_loss
    from kubetune.trainer.packing import PackedCollator, model_inputs
    from kubetune.trainer.training import _compile

    torch._dynamo.reset()
    if setting is None:
        monkeypatch.delenv("KUBETUNE_COMPILE_TANGENTS", raising=False)
    else:
        monkeypatch.setenv("KUBETUNE_COMPILE_TANGENTS", setting)
    monkeypatch.setattr(attention, "varlen_available", lambda tensor: True)
    monkeypatch.setattr(attention, "_UNIFORM_BACKENDS", [SDPBackend.MATH])
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )).train()
    attention.enable_packed_attention(model)
    g = torch.Generator().manual_seed(1)
    docs = [{"input_ids": (ids := torch.randint(0, 96, (32,), generator=g).tolist()), "labels": ids} for _ in range(4)]
    inputs = model_inputs(PackedCollator(128)(docs))
    eager = causal_lm_loss(model, backend="chunked", **inputs)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    with functorch_config.patch(guess_tangent_strides_as_outputs=False):  # torch 2.11's default
        _compile(types.SimpleNamespace(module=model))
        try:
            causal_lm_loss(model, backend="chunked", **inputs).backward()  # compiles
            model.zero_grad()
            with torch.profiler.profile() as prof:
                loss = causal_lm_loss(model, backend="chunked", **inputs)
                loss.backward()
        finally:
            torch._dynamo.reset()
    copies = sum(e.count for e in prof.key_averages() if e.key == "aten::contiguous")
    assert copies == (3 * model.config.num_hidden_layers if setting == "torch" else 0)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
