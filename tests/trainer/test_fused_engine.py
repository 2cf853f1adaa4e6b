"""The fused single-process engine: same math as torch's AdamW in fp32, checkpoints that resume.

Issue 15 moved one-GPU bf16 runs off DeepSpeed's ZeRO step onto
:mod:`kubetune.trainer.fused_engine` (fp32 master weights updated by a fused AdamW over fp32
gradient buffers; since then, without accumulation, over the bf16 gradients in place). These tests
run it on CPU: the optimizer against ``torch.optim.AdamW`` on fp32 copies fed the same gradients
(clipping, weight decay, Adam and AdamW, both the fused kernel and the foreach fallback, from fp32
buffers and from bf16 ``param.grad``), the non-finite skip, gradient accumulation, checkpoints written and
resumed by the trainer, a fused checkpoint resumed by DeepSpeed, and which engine a spec gets.
The Triton kernel of :mod:`kubetune.trainer.adam_kernel` runs the same checks in
``tests/trainer/test_gpu.py`` (CUDA only).
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch

from kubetune.trainer.fused_engine import FusedEngine, MasterWeightAdamW
from tests.support.tiny_models import manifest, write_dataset


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, 5, generator=g), torch.randn(300, generator=g), torch.randn(4, 4, 3, generator=g)]


def check_update_matches_torch_adamw(update, decoupled, max_norm, source, device="cpu"):
    """Five steps of ``MasterWeightAdamW`` against ``torch.optim.AdamW``/``Adam`` on fp32 copies fed the same gradients.

    ``source``: ``buffers`` (fp32 gradient buffers, as under gradient accumulation) or ``param.grad``
    (the bf16 gradients autograd leaves, read in place). Shared with the GPU test of the Triton kernel.
    """
    start = [p.to(device) for p in _params()]
    low = [p.to(torch.bfloat16).requires_grad_() for p in start]
    ref = [p.to(torch.bfloat16).float().requires_grad_() for p in start]  # the same starting values
    wd = 0.1
    ours = MasterWeightAdamW([{"params": low, "lr": 3e-3, "weight_decay": wd}], betas=(0.9, 0.95), eps=1e-8,
                             decoupled=decoupled, grad_buffers=source == "buffers", update=update)
    if update == "fused" and not ours._fused:
        pytest.skip("this torch has no fused Adam kernel for this device")
    assert ours.kernel == update
    assert ("grad" in ours.state[low[0]]) == (source == "buffers")
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    theirs = kind(ref, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [(torch.randn(p.shape, generator=g) * 3).to(torch.bfloat16).to(device) for p in start]
        for p, grad in zip(low, grads):
            if source == "buffers":
                ours.state[p]["grad"].copy_(grad)
            else:
                p.grad = grad.clone()
        for p, grad in zip(ref, grads):
            p.grad = grad.float()
        norm = ours.step(max_grad_norm=max_norm)
        expected_norm = torch.linalg.vector_norm(torch.stack([gr.float().norm() for gr in grads]))
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref, max_norm)
        theirs.step()
        assert torch.allclose(norm, expected_norm, rtol=1e-5)
        for p, r in zip(low, ref):
            master = ours.state[p]["master"]
            assert torch.allclose(master, r.detach(), rtol=1e-5, atol=1e-6), (master - r).abs().max()
            assert torch.equal(p.detach(), master.to(torch.bfloat16))  # the weights are the rounded masters
    assert float(ours.step_count) == 5


@pytest.mark.parametrize("update", ["fused", "foreach"], ids=["fused-kernel", "foreach"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("source", ["buffers", "param.grad"])
def test_update_matches_torch_adamw_on_fp32_copies(update, decoupled, max_norm, source):
    check_update_matches_torch_adamw(update, decoupled, max_norm, source)


def test_the_triton_update_is_asked_for_only_where_it_runs():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: tests/trainer/test_gpu.py runs the kernel")
    low = [p.to(torch.bfloat16) for p in _params()]
    assert MasterWeightAdamW([{"params": low}]).kernel in ("fused", "foreach")  # auto on CPU: never Triton
    with pytest.raises(ValueError, match="update: triton needs .*CUDA"):
        MasterWeightAdamW([{"params": low}], update="triton")
    with pytest.raises(ValueError, match="update: must be one of auto, triton, fused, foreach, got 'fast'"):
        MasterWeightAdamW([{"params": low}], update="fast")


def check_non_finite_gradient_skips_the_whole_update(update="auto", device="cpu", source="buffers"):
    low = [p.to(device=device, dtype=torch.bfloat16) for p in _params()]
    opt = MasterWeightAdamW([{"params": low, "lr": 1e-2, "weight_decay": 0.0}], update=update,
                            grad_buffers=source == "buffers")
    grads = [opt.state[p]["grad"] for p in low] if source == "buffers" else [torch.empty_like(p) for p in low]
    for p, grad in zip(low, grads):
        grad.fill_(0.5)
        if source != "buffers":
            p.grad = grad
    opt.step(max_grad_norm=1.0)
    before = copy.deepcopy({k: [opt.state[p][k].clone() for p in low] for k in ("master", "exp_avg", "exp_avg_sq")})
    weights = [p.clone() for p in low]
    grads[1][3] = float("nan")
    norm = opt.step(max_grad_norm=1.0)
    assert not torch.isfinite(norm)
    assert float(opt.step_count) == 1
    for key, tensors in before.items():
        assert all(torch.equal(a, opt.state[p][key]) for a, p in zip(tensors, low)), key
    assert all(torch.equal(a, b) for a, b in zip(weights, low))


@pytest.mark.parametrize("source", ["buffers", "param.grad"])
def test_a_non_finite_gradient_skips_the_whole_update(source):
    check_non_finite_gradient_skips_the_whole_update(source=source)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _fused_engine(model: torch.nn.Module, accumulation: int = 1, lr: float = 1e-2) -> FusedEngine:
    # As engines._build_fused makes it: fp32 gradient buffers only under gradient accumulation.
    opt = MasterWeightAdamW([{"params": list(model.parameters()), "lr": lr, "weight_decay": 0.01}],
                            grad_buffers=accumulation > 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return FusedEngine(model, opt, sched, gradient_accumulation_steps=accumulation, max_grad_norm=1.0)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def test_gradient_accumulation_sums_micro_batches_like_one_big_batch():
    batches = _batches(4)
    acc = _fused_engine(_mlp(), accumulation=2)
    for x, y in batches:
        acc.backward(torch.nn.functional.mse_loss(acc(x), y))
        acc.step()
    ref_model = _mlp()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda step: 1.0 / (1 + step))
    for i in range(0, 4, 2):
        ref.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(ref_model(x), y) for x, y in batches[i:i + 2]) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        ref.step()
        sched.step()
    assert acc.global_steps == 2 and acc.get_lr() == [pytest.approx(1e-2 / 3)]
    for a, b in zip(acc.module.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
        assert a.grad is None  # gradients live in the fp32 buffers, never as a second copy


def test_without_accumulation_the_step_reads_param_grad_and_frees_it():
    batches = _batches(3)
    engine = _fused_engine(_mlp())
    assert all("grad" not in engine.optimizer.state[p] for p in engine.module.parameters())  # no fp32 copy
    ref_model = _mlp()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda step: 1.0 / (1 + step))
    for x, y in batches:
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        assert all(p.grad is not None for p in engine.module.parameters())  # left by autograd for the step
        engine.step()
        assert all(p.grad is None for p in engine.module.parameters())  # freed by the step
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        ref.step()
        sched.step()
    for a, b in zip(engine.module.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpoint_resumes_exactly_where_it_stopped(tmp_path):
    batches = _batches(6)
    straight = _fused_engine(_mlp())
    for x, y in batches:
        straight.backward(torch.nn.functional.mse_loss(straight(x), y))
        straight.step()

    first = _fused_engine(_mlp())
    for x, y in batches[:3]:
        first.backward(torch.nn.functional.mse_loss(first(x), y))
        first.step()
    first.save_checkpoint(str(tmp_path), tag="state", save_latest=False)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["fused_optim_states.pt", "mp_rank_00_model_states.pt"]
    # The weights load the usual way: DeepSpeed's file name and "module" key.
    module = torch.load(tmp_path / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert set(module) == set(_mlp().state_dict())

    second = _fused_engine(_mlp(seed=99))
    path, _ = second.load_checkpoint(str(tmp_path), tag="state")
    assert path == str(tmp_path / "state")
    for x, y in batches[3:]:
        second.backward(torch.nn.functional.mse_loss(second(x), y))
        second.step()
    assert second.get_lr() == straight.get_lr()
    for a, b in zip(second.module.parameters(), straight.module.parameters()):
        assert torch.equal(a, b)


def test_the_fused_engine_refuses_a_deepspeed_optimizer_state(tmp_path):
    engine = _fused_engine(_mlp())
    engine.save_checkpoint(str(tmp_path), tag="state", save_latest=False)
    (tmp_path / "state" / "fused_optim_states.pt").rename(tmp_path / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(RuntimeError, match="written by DeepSpeed.*engine: deepspeed"):
        _fused_engine(_mlp()).load_checkpoint(str(tmp_path), tag="state")


def _spec(**training: object):
    from kubetune.api import parse_job

    spec: dict = {"model": {"source": "m"}, "data": {"datasets": [{"name": "d", "source": "d.jsonl", "format": "text"}]}}
    deepspeed = training.pop("deepspeed", None)
    if deepspeed:
        spec["deepspeed"] = deepspeed
    if training:
        spec["training"] = training
    return parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": spec}).spec


@pytest.mark.parametrize(("case", "kwargs", "expected"), [
    ("one bf16 GPU process", {}, "fused"),
    ("two processes", {"world_size": 2}, "deepspeed"),
    ("CPU", {"on_gpu": False, "precision": "fp32"}, "deepspeed"),
    ("fp16", {"precision": "fp16"}, "deepspeed"),
    ("sgd", {"spec": {"optimizer": "sgd"}}, "deepspeed"),
    ("offload", {"spec": {"deepspeed": {"offloadOptimizer": "cpu"}}}, "deepspeed"),
    ("ZeRO-3", {"spec": {"deepspeed": {"zeroStage": 3}}}, "deepspeed"),
    ("escape hatch", {"spec": {"deepspeed": {"config": {"bf16": {"enabled": True}}}}}, "deepspeed"),
    ("asked for deepspeed", {"spec": {"deepspeed": {"engine": "deepspeed"}}}, "deepspeed"),
    ("asked for fused on CPU", {"spec": {"deepspeed": {"engine": "fused"}}, "on_gpu": False, "precision": "fp32"}, "fused"),
])
def test_which_engine_a_run_gets(case, kwargs, expected):
    from kubetune.trainer.engines import engine_kind

    spec = _spec(**kwargs.get("spec", {}))
    kind, why = engine_kind(spec, kwargs.get("world_size", 1), kwargs.get("precision", "bf16"), kwargs.get("on_gpu", True), _mlp())
    assert kind == expected, why


@pytest.mark.parametrize(("accumulation", "env", "buffers", "update"), [
    (1, None, False, "fused"),      # on CPU: torch's fused kernel over the bf16 gradients read in place
    (2, None, True, "fused"),       # accumulation sums micro-batches into fp32 buffers
    (1, "buffers", True, "fused"),  # KUBETUNE_FUSED_UPDATE=buffers: the step before the one-pass kernel (bench A/B)
])
def test_the_engine_keeps_fp32_gradient_buffers_only_under_accumulation(accumulation, env, buffers, update, monkeypatch):
    from kubetune.trainer.engines import _build_fused

    if env:
        monkeypatch.setenv("KUBETUNE_FUSED_UPDATE", env)
    else:
        monkeypatch.delenv("KUBETUNE_FUSED_UPDATE", raising=False)
    model = _mlp()
    spec = _spec(gradientAccumulationSteps=accumulation)
    engine = _build_fused(spec, model, [{"params": list(model.parameters()), "weight_decay": 0.0}], 10, "fp32", on_gpu=False)
    assert engine.optimizer.grad_buffers is buffers
    assert engine.optimizer.kernel == (update if engine.optimizer._fused_available(torch.device("cpu")) else "foreach")


def test_a_deepspeed_checkpoint_keeps_the_deepspeed_engine(tmp_path):
    from kubetune.trainer.engines import engine_kind

    state = tmp_path / "step-00000004" / "state"
    state.mkdir(parents=True)
    (state / "mp_rank_00_model_states.pt").write_bytes(b"")
    (state / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    kind, why = engine_kind(_spec(), 1, "bf16", True, _mlp(), resume_from=tmp_path / "step-00000004")
    assert kind == "deepspeed" and "resuming DeepSpeed checkpoint step-00000004" in why


@pytest.mark.parametrize(("extra", "message"), [
    ({"resources": {"gpusPerNode": 2}}, "the fused engine runs one process, this job has 2"),
    ({"deepspeed": {"engine": "fused", "zeroStage": 3}}, "no ZeRO-3 and no offload"),
    ({"training": {"precision": "fp16"}, "resources": {"gpusPerNode": 1}}, "no fp16 loss scaler"),
    ({"training": {"optimizer": "sgd"}}, "runs adamw or adam, not sgd"),
])
def test_spec_refuses_the_fused_engine_where_it_cannot_run(extra, message):
    from kubetune.api import parse_job
    from kubetune.api.problems import SpecError

    spec = {"model": {"source": "m"}, "data": {"datasets": [{"name": "d", "source": "d.jsonl", "format": "text"}]},
            "deepspeed": {"engine": "fused"}}
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value}
    with pytest.raises(SpecError, match=f"spec.deepspeed.engine: .*{message}"):
        parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": spec})


def test_packing_max_examples_needs_packing():
    from kubetune.api import parse_job
    from kubetune.api.problems import SpecError

    spec = {"model": {"source": "m"}, "data": {"datasets": [{"name": "d", "source": "d.jsonl", "format": "text"}]},
            "training": {"packing": False, "packingMaxExamples": 8}}
    with pytest.raises(SpecError, match="spec.training.packingMaxExamples: .*packing is off"):
        parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": spec})


def test_trainer_trains_checkpoints_and_resumes_on_the_fused_engine(tiny_model_dir, train_job, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl", "text")
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={
        "deepspeed.engine": "fused", "training.packing": True, "training.maxSteps": 6,
        "checkpointing.everySteps": 3, "data.eval": None, "training.logEverySteps": 1,
    })
    straight = train_job(job, tmp_path / "straight")
    assert straight.rc == 0, straight.output
    log = straight.log()
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["loss"] < log[0]["loss"]
    assert (straight.checkpoint_dir / "step-00000006" / "state" / "fused_optim_states.pt").exists()
    assert (straight.output_dir / "config.json").exists()

    first = train_job(job, tmp_path / "resumed", max_steps=3)
    second = train_job(job, tmp_path / "resumed", max_steps=6)
    assert first.rc == second.rc == 0
    resumed = second.log()
    assert [r["step"] for r in resumed] == list(range(1, 7))
    # Masters, moments, schedule and data position restored: the uninterrupted curve.
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    assert [r["learning_rate"] for r in resumed] == pytest.approx([r["learning_rate"] for r in log])


def test_deepspeed_resumes_a_fused_checkpoint(tmp_path):
    """1 -> N processes: a DeepSpeed ZeRO-2 engine takes the fused engine's weights and Adam state."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from kubetune.trainer.distributing import init_distributed
    from kubetune.trainer.engines import load_fused_into_deepspeed

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631"}.items():
        os.environ.setdefault(key, value)
    init_distributed(False)
    fused = _fused_engine(_mlp())
    for x, y in _batches(3):
        fused.backward(torch.nn.functional.mse_loss(fused(x), y))
        fused.step()
    fused.save_checkpoint(str(tmp_path), tag="state", save_latest=False)

    model = _mlp(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": False},
        "zero_allow_untested_optimizer": True})
    load_fused_into_deepspeed(engine, tmp_path / "state")  # a fresh engine, as a resume finds it (no step yet)
    for (name, p), q in zip(engine.module.named_parameters(), fused.module.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
        assert torch.equal(safe_get_full_fp32_param(p), fused.optimizer.state[q]["master"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(safe_get_full_optimizer_state(p, key), fused.optimizer.state[q][key]), (name, key)


@pytest.mark.slow
def test_layers_compile_once_for_packs_of_varying_length_under_a_packing_budget():
    """training.packingMaxExamples gives packs of varying length: the layers are compiled for a dynamic
    length from the first pack, so a new length never recompiles (by default torch compiles the first
    length statically and recompiles on the second: on the GPU a budget run of 12 steps spent most of
    its time compiling)."""
    import torch._dynamo
    import torch._dynamo.utils
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.trainer.training import _compile

    torch._dynamo.reset()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    _compile(SimpleNamespace(module=model), dynamic=True)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for length in (256, 512, 768):
            model(input_ids=torch.randint(0, 64, (1, length)), use_cache=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def _saved_activation_widths(model: torch.nn.Module, tokens: int, width: int) -> tuple[int, list[torch.Tensor]]:
    """How many distinct tensors of ``tokens x width`` elements one training forward of ``model`` saves
    for backward (saved-tensor hooks; parameters left out), and the gradients of one backward."""
    saved: dict[int, tuple[int, ...]] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel() == tokens * width and t.shape[-1] == width:
            saved[ptr] = tuple(t.shape)
        return t

    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, tokens))
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
    logits.float().pow(2).mean().backward()
    return len(saved), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_layers_recompute_the_mlp_product_instead_of_saving_it():
    """The per-layer compile recomputes silu(gate) * up (and the RMSNorm output) in backward instead of
    keeping it: per layer only gate and up stay saved at the MLP's width, 16 KiB per token less at the
    Llama-3.2-1B shape (the peak on instruction data went over the padding-free baseline's). Same
    gradients as eager; torch's default partitioning (the one before) keeps all three."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.trainer.training import _compile

    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    eager = LlamaForCausalLM(config).train()
    tokens = 32
    eager_count, eager_grads = _saved_activation_widths(eager, tokens, 80)
    assert eager_count == 4 * 2  # gate, silu(gate), up and the product, in each of the 2 layers

    default = copy.deepcopy(eager)
    torch._dynamo.reset()
    with functorch_config.patch(ban_recompute_materialized_backward=True):
        default.model.layers[0].compile()
        default.model.layers[1].compile()
        default_count, _ = _saved_activation_widths(default, tokens, 80)
    assert default_count == 3 * 2

    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    try:
        _compile(SimpleNamespace(module=compiled))
        count, grads = _saved_activation_widths(compiled, tokens, 80)
    finally:
        functorch_config.ban_recompute_materialized_backward = True
        torch._dynamo.reset()
    assert count == 2 * 2
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
