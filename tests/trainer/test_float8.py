"""training.precision fp8: the refusals, which linear layers go float8, and the conversion itself.

The float8 matrix products need an FP8 GPU (bench/README.md has the H100 numbers); on CPU these
tests check everything around them: the one-line refusals (CPU, a GPU without FP8, no torchao),
the layer filter on tiny models built from config, and — torchao being installable here — that
the conversion swaps exactly the chosen layers, keeps the parameters and their names, and leaves
the rest of the trainer's wiring (DeepSpeed section, engine choice, compile default) as for bf16.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from kubetune.trainer import engines, float8
from kubetune.trainer.models import ModelError


def _llama(**config):
    import transformers

    fields = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config}))


LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _fake_gpu(monkeypatch, capability, name="NVIDIA H100 80GB HBM3"):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)


# --- refusals -----------------------------------------------------------------------------------


def test_fp8_on_cpu_is_refused_naming_the_field():
    with pytest.raises(ModelError) as err:
        float8.check_support(on_gpu=False)
    assert str(err.value).startswith("spec.training.precision: fp8 needs a GPU with FP8 tensor cores")
    assert "use bf16 or fp32 on CPU" in str(err.value)


@pytest.mark.parametrize("capability,name", [((8, 0), "NVIDIA A100-SXM4-80GB"), ((8, 6), "NVIDIA A10"), ((7, 0), "Tesla V100")])
def test_fp8_on_a_gpu_without_fp8_is_refused_with_its_name_and_capability(monkeypatch, capability, name):
    _fake_gpu(monkeypatch, capability, name)
    with pytest.raises(ModelError) as err:
        float8.check_support(on_gpu=True)
    message = str(err.value)
    assert message.startswith("spec.training.precision: fp8 needs FP8 tensor cores (compute capability >= 8.9")
    assert f"{name} has {capability[0]}.{capability[1]}; use precision bf16" in message


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_without_torchao_is_refused_naming_the_extra(monkeypatch, capability):
    _fake_gpu(monkeypatch, capability)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ModelError) as err:
        float8.check_support(on_gpu=True)
    assert str(err.value).startswith("spec.training.precision: fp8 trains through torchao's float8 linear layers and torchao is not installed")
    assert "pip install 'kubetune[gpu]'" in str(err.value)


def test_resolve_precision_checks_fp8_and_keeps_it(monkeypatch):
    spec = SimpleNamespace(training=SimpleNamespace(precision="fp8"))
    with pytest.raises(ModelError, match="fp8 needs a GPU"):
        engines.resolve_precision(spec, on_gpu=False)
    calls = []
    monkeypatch.setattr(float8, "check_support", lambda on_gpu: calls.append(on_gpu))
    assert engines.resolve_precision(spec, on_gpu=True) == "fp8" and calls == [True]


def test_kubetune_train_with_fp8_on_cpu_exits_2_with_one_line(tmp_path, tiny_model_dir, train_job, capsys):
    from tests.support.tiny_models import manifest, write_dataset

    data = write_dataset(tmp_path / "d.jsonl", "text", n=8)
    body = manifest(tiny_model_dir("llama"), data, "text",
                    overrides={"training.precision": "fp8", "resources.gpusPerNode": 1})
    run = train_job(body, tmp_path / "run")
    assert run.rc == 2
    out = capsys.readouterr().out
    assert "spec.training.precision: fp8 needs a GPU with FP8 tensor cores" in out
    assert "Traceback" not in out


# --- the engine sees a bf16 run -----------------------------------------------------------------


def test_fp8_is_bf16_for_deepspeed_and_the_fused_engine():
    from kubetune.api import parse_spec

    spec = parse_spec({"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]},
                       "training": {"precision": "fp8"}, "resources": {"gpusPerNode": 1}})
    assert engines.deepspeed_config(spec, 1, "fp8")["bf16"] == {"enabled": True}
    assert "fp16" not in engines.deepspeed_config(spec, 1, "fp8")
    model = torch.nn.Linear(16, 16)
    assert engines.engine_kind(spec, 1, "fp8", True, model) == ("fused", "one fp8 process on a GPU")
    assert engines.engine_kind(spec, 2, "fp8", True, model)[0] == "deepspeed"


def test_fp8_turns_compile_on_by_default_on_a_gpu(tmp_path):
    from kubetune.api import parse_job
    from kubetune.trainer.running import RunOptions, RunPaths
    from kubetune.trainer.training import Trainer

    def compiled(training, on_gpu, packing=False):
        job = parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
                         "spec": {"model": {"source": "hf://o/m"}, "resources": {"gpusPerNode": 1},
                                  "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]},
                                  "training": {"packing": packing, **training}}})
        trainer = Trainer(job, RunPaths(tmp_path, tmp_path, tmp_path, tmp_path), RunOptions(local=True))
        trainer.on_gpu = on_gpu
        return trainer._compile_enabled()

    assert compiled({"precision": "fp8"}, on_gpu=True)
    assert not compiled({"precision": "bf16"}, on_gpu=True)  # unpacked bf16: off, as before
    assert not compiled({"precision": "fp8", "compile": False}, on_gpu=True)  # an explicit choice wins
    assert not compiled({"precision": "fp8"}, on_gpu=False)


# --- which layers -------------------------------------------------------------------------------


def test_every_trainable_decoder_linear_goes_float8_and_the_lm_head_does_not():
    model = _llama()
    names = float8.plan(model)
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    assert "lm_head" not in names


def test_the_lm_head_stays_out_when_tied_to_the_embeddings():
    model = _llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" not in float8.plan(model)


def test_layers_whose_sizes_are_not_multiples_of_16_stay_bf16():
    model = _llama(intermediate_size=120)  # gate/up out, down in: 120 = 7.5 x 16
    names = float8.plan(model)
    assert not any(n.endswith(("gate_proj", "up_proj", "down_proj")) for n in names)
    assert [n for n in names if n.startswith("model.layers.0.")] == [f"model.layers.0.{n}" for n in LINEARS[:4]]


def test_frozen_layers_stay_bf16():
    """torchao computes a frozen weight's gradient anyway: only layers that learn go float8."""
    model = _llama()
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    assert float8.plan(model) == [f"model.layers.1.{n}" for n in LINEARS]


def test_a_classification_head_of_few_labels_stays_bf16():
    import transformers

    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))
    names = float8.plan(model)
    assert "score" not in names and len(names) == len(LINEARS)


# --- the conversion (torchao on CPU: the swap, not the float8 products) ---------------------------


def test_convert_swaps_exactly_the_planned_layers_and_keeps_parameters_and_names():
    ao = pytest.importorskip("torchao.float8.float8_linear", reason="torchao is in the gpu extra")
    model = _llama(intermediate_size=120)
    planned = float8.plan(model)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())

    assert float8.convert(model) == planned
    swapped = [n for n, m in model.named_modules() if isinstance(m, ao.Float8Linear)]
    assert swapped == planned
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # param groups stay valid
    assert list(model.state_dict()) == keys  # checkpoints and the export see the same names
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.config.cast_config_input.scaling_granularity.value == "tensorwise"
    assert layer.config.pad_inner_dim is False


def test_convert_pads_the_inner_dimension_when_asked():
    pytest.importorskip("torchao.float8", reason="torchao is in the gpu extra")
    model = _llama(num_hidden_layers=1)
    float8.convert(model, pad_inner_dim=True)
    assert model.model.layers[0].mlp.down_proj.config.pad_inner_dim is True


@pytest.mark.parametrize("packing,micro,seq,cap,aligned", [
    (True, 8, 2048, None, True),     # the token budget, a multiple of 16
    (True, 3, 100, None, False),     # a budget of 300 tokens
    (True, 3, 100, 4, True),         # packs capped by examples are padded to multiples of 256
    (False, 8, 2048, None, False),   # padded batches are as long as their longest row
])
def test_micro_batches_hold_a_multiple_of_16_tokens_only_when_packed_to_one(packing, micro, seq, cap, aligned):
    training = SimpleNamespace(packing=packing, micro_batch_size=micro, max_seq_length=seq, packing_max_examples=cap)
    assert float8.tokens_aligned(training) is aligned


def test_emulated_fp8_training_follows_the_full_precision_loss_curve():
    """The converted layers really compute in float8 (the losses differ from fp32) and train the same
    curve within float8's error (torchao's emulation: the same casts and scales, no FP8 hardware)."""
    pytest.importorskip("torchao.float8", reason="torchao is in the gpu extra")

    def losses(fp8: bool) -> list[float]:
        model = _llama()
        if fp8:
            float8.convert(model, emulate=True)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        batch = torch.randint(0, 16, (4, 32), generator=g)  # a small vocabulary slice: learnable fast
        out = []
        for _ in range(8):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    full, fp8 = losses(False), losses(True)
    assert fp8 != full
    assert fp8[-1] < fp8[0] - 1.0  # it learns
    assert max(abs(a - b) / a for a, b in zip(fp8, full)) < 0.05, (fp8, full)


@pytest.mark.parametrize("engine", ["deepspeed", "fused"])
def test_float8_layers_train_under_both_engines(engine):
    """The converted model goes to the engine the trainer builds (DeepSpeed ZeRO-2 flattens the weights
    into its buffers; the fused engine keeps fp32 masters of them): float8 layers' weights learn under
    either. CPU, fp32 weights and torchao's emulated float8; on a GPU the same path runs bf16 + FP8."""
    pytest.importorskip("torchao.float8", reason="torchao is in the gpu extra")
    import os

    from kubetune.api import parse_spec
    from kubetune.trainer.distributing import init_distributed
    from kubetune.trainer.optimizing import default_param_groups

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29637"}.items():
        os.environ.setdefault(key, value)
    init_distributed(False)
    spec = parse_spec({"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]},
                       "training": {"precision": "fp32", "learningRate": 3e-3, "lrScheduler": "constant", "warmupSteps": 0,
                                    "microBatchSize": 4},
                       "deepspeed": {"zeroStage": 2, "engine": engine}})
    model = _llama()
    names = float8.convert(model, emulate=True)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    built = engines.build_engine(spec, model, default_param_groups(model, spec), 10, 1, "fp32", on_gpu=False)
    assert engines.LAST_ENGINE_KIND == engine
    batch = torch.randint(0, 16, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        loss = built(input_ids=batch, labels=batch).loss
        built.backward(loss)
        built.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    module = built.module
    assert all(type(module.get_submodule(n)).__name__ == "Float8Linear" for n in names)
    assert all(not torch.equal(module.get_submodule(n).weight.detach(), before[n]) for n in names)
