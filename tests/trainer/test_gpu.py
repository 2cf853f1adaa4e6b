"""The trainer on CUDA: bf16 mixed precision, NCCL, packed attention, QLoRA (``-m gpu``, never in CI)."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_models import manifest, write_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _job(tiny_model_dir, tmp_path, fmt="text", **overrides):
    data = write_dataset(tmp_path / "data.jsonl", fmt, n=64)
    base = {"resources.gpusPerNode": 1, "training.precision": None, "training.maxSteps": 8, "training.learningRate": 0.002}
    return manifest(tiny_model_dir("llama"), data, fmt, overrides={**base, **overrides})


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_bf16_zero2_on_one_gpu(peft, tiny_model_dir, train_job, tmp_path):
    run = train_job(_job(tiny_model_dir, tmp_path, **{"peft.method": peft, "deepspeed.zeroStage": 2}), tmp_path / "run", subprocess_=True)
    assert run.rc == 0, run.output[-4000:]
    assert ", bf16," in run.output  # precision auto → bf16 on a GPU that supports it
    log = run.log()
    assert log[-1]["loss"] < log[0]["loss"]
    # `kubetune train` ends through end_process (no interpreter teardown) with CUDA initialised: every file the
    # run writes is whole on disk when the process is gone (trainer/exiting.py).
    assert log[-1]["step"] == 8
    weights = "adapter_model.safetensors" if peft == "lora" else "model.safetensors"
    assert (run.output_dir / weights).stat().st_size > 0
    assert any(f.stat().st_size > 0 for f in (run.output_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_compiled_model_trains(tiny_model_dir, train_job, tmp_path):
    run = train_job(_job(tiny_model_dir, tmp_path, **{"training.compile": True, "deepspeed.zeroStage": 0}), tmp_path / "run", subprocess_=True)
    assert run.rc == 0, run.output[-4000:]
    log = run.log()
    assert log[-1]["loss"] < log[0]["loss"]


def test_packed_instruction_training_on_gpu(tiny_model_dir, train_job, tmp_path):
    run = train_job(_job(tiny_model_dir, tmp_path, "instruction", **{"training.packing": True}), tmp_path / "run", subprocess_=True)
    assert run.rc == 0, run.output[-4000:]
    log = run.log()
    assert log[-1]["loss"] < log[0]["loss"]


def test_qlora_trains_or_names_the_missing_package(tiny_model_dir, train_job, tmp_path):
    run = train_job(_job(tiny_model_dir, tmp_path, **{"peft.method": "qlora"}), tmp_path / "run", subprocess_=True)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert run.rc == 2 and "qlora needs the bitsandbytes package" in run.output
    else:
        assert run.rc == 0, run.output[-4000:]
        assert (run.output_dir / "adapter_model.safetensors").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("stage", [2, 3])
def test_two_gpus_nccl(stage, tiny_model_dir, train_job, tmp_path):
    job = _job(tiny_model_dir, tmp_path, **{"deepspeed.zeroStage": stage, "peft.method": "lora", "checkpointing.everySteps": 4})
    run = train_job(job, tmp_path / "run", nproc=2)
    assert run.rc == 0, run.output[-4000:]
    assert "2 processes" in run.output
    again = train_job(job, tmp_path / "run", nproc=2, max_steps=10)
    assert again.rc == 0 and "at step 8" in again.output


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("source", ["buffers", "param.grad"])
def test_the_triton_update_matches_torch_adamw(decoupled, max_norm, source):
    from tests.trainer.test_fused_engine import check_update_matches_torch_adamw

    check_update_matches_torch_adamw("triton", decoupled, max_norm, source, device="cuda")


@pytest.mark.parametrize("source", ["buffers", "param.grad"])
def test_the_triton_update_skips_a_non_finite_gradient(source):
    from tests.trainer.test_fused_engine import check_non_finite_gradient_skips_the_whole_update

    check_non_finite_gradient_skips_the_whole_update("triton", device="cuda", source=source)


def test_unbacked_traced_layers_compile_one_graph_for_every_pack_length():
    """KUBETUNE_COMPILE_LENGTH=unbacked+traced on CUDA: the real flash varlen op traced into the layer
    graph, the length unbacked: one graph for packs of 768 to 5,632 tokens (no range recompile), and
    the loss of each pack as eager's within bf16 noise (tests/trainer/test_compile_length.py on CPU)."""
    import types

    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    import torch._dynamo.utils

    from kubetune.trainer import attention, compiling
    from kubetune.trainer.training import _compile
    from tests.trainer.test_compile_length import SPANS, _model, _packs, _train

    packs = _packs(SPANS, device="cuda")
    model = _model().to("cuda", torch.bfloat16)
    eager = _train(model, packs)
    modes = frozenset({"unbacked", "traced"})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with dynamo_config.patch(automatic_dynamic_shapes_mark_as="dynamic"):
            _compile(types.SimpleNamespace(module=model), dynamic=compiling.compile_dynamic(8, modes), length_modes=modes)
            compiled = _train(model, packs)
    finally:
        attention.trace_varlen(False)
        torch._dynamo.reset()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for (want, _), (loss, _) in zip(eager, compiled):
        torch.testing.assert_close(loss.float(), want.float(), rtol=2e-2, atol=2e-2)
