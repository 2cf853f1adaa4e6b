"""The trainer's speed paths stay correct on CPU: ZeRO-3 with packing, the norm-based bf16 step skip.

The GPU speed work (issue 8) changed what runs by default: the fused loss reads ``lm_head.weight``
outside the head's forward (ZeRO-3 partitions it, so the loss gathers it), and bf16 ZeRO-1/2 steps
are skipped on a non-finite gradient norm instead of DeepSpeed's per-tensor overflow scan. These
tests run both on CPU with a tiny Llama.
"""

from __future__ import annotations

import os

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
