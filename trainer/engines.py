"""The engine of a run: which one, and its DeepSpeed config derived from the spec.

Called by the training loop (``kubetune.trainer.training``) once the model is built and the
technique hooks have shaped the parameter groups. :func:`engine_kind` picks the engine: the fused
single-process engine (:mod:`kubetune.trainer.fused_engine`, no DeepSpeed) for one bf16 process on
a GPU where nothing needs DeepSpeed, DeepSpeed's ZeRO engine otherwise (``deepspeed.engine``
overrides). :func:`deepspeed_config` is pure (a test checks it); :func:`build_engine` takes the torch
optimizer and the learning-rate schedule from :mod:`kubetune.trainer.optimizing` and hands both to
``deepspeed.initialize``. The process group is :mod:`kubetune.trainer.distributing`'s. A DeepSpeed engine resuming a fused
engine's checkpoint (a run moved from one GPU to several) reads it through
:func:`load_fused_into_deepspeed`.

What the spec decides:

* ``deepspeed.zeroStage`` 0–3, ``offloadOptimizer``/``offloadParams`` (cpu);
* ``training.precision``: bf16/fp16 sections (auto = bf16 on a GPU that supports it, else fp32;
  fp8 is bf16 here, its float8 layers are :mod:`kubetune.trainer.float8`'s);
* ``training.maxGradNorm`` → ``gradient_clipping``; ``gradientAccumulationSteps`` and
  ``microBatchSize`` → the batch keys (always derived, even over the escape hatch);
* ``deepspeed.config`` — the escape hatch — is deep-merged over the result (its keys win, except
  the batch sizes).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.optimizing import make_optimizer, make_scheduler

log = logging.getLogger("kubetune.trainer")

#: Precisions whose weights, DeepSpeed section and fused engine are bf16 (fp8 multiplies in float8 on top).
BF16_WEIGHTS = ("bf16", "fp8")


def resolve_precision(spec: Any, on_gpu: bool) -> str:
    """bf16, fp16, fp32 or fp8 for this run; fp8 is refused where it cannot run (:mod:`kubetune.trainer.float8`)."""
    precision = spec.training.precision
    if precision == "fp8":
        from kubetune.trainer.float8 import check_support

        check_support(on_gpu)
        return precision
    if precision == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if not on_gpu and precision == "fp16":
        from kubetune.trainer.models import ModelError

        raise ModelError("spec.training.precision: fp16 mixed precision needs a GPU and this machine has none; use bf16 or fp32 on CPU")
    return precision


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(spec: Any, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config for ``spec`` on ``world_size`` processes (see the module doc)."""
    t, ds = spec.training, spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if world_size == 1 and ds.zero_stage in (1, 2):
        # One process has nothing to overlap or bucket: the side stream and the contiguous copy
        # only add work (+2% tokens/s without them on an H100, bench/README.md).
        zero.update(overlap_comm=False, contiguous_gradients=False)
    if ds.zero_stage >= 1 and ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # Gather full weights when the engine saves a 16-bit model; the trainer exports through it.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_params == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer reports progress itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.max_grad_norm is not None:
        config["gradient_clipping"] = t.max_grad_norm
    if precision in BF16_WEIGHTS:
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if ds.config:
        config = deep_merge(config, ds.config)
    # Batch sizes always follow training.*, whatever the escape hatch says.
    config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    config["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    config["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    return config


#: The kind of the engine :func:`build_engine` built last in this process ("fused" or "deepspeed"); the bench reports it.
LAST_ENGINE_KIND: str | None = None


def engine_kind(spec: Any, world_size: int, precision: str, on_gpu: bool, model: torch.nn.Module,
                resume_from: Path | None = None) -> tuple[str, str]:
    """``("fused" | "deepspeed", why)``: which engine runs this process (``deepspeed.engine``).

    Unset, the fused engine (:mod:`kubetune.trainer.fused_engine`) runs wherever it is safe: one
    process on a GPU, bf16, adamw or adam, ZeRO stage <= 2 without offload, no ``deepspeed.config``
    escape hatch, every weight a floating-point tensor (no quantized base), and no DeepSpeed
    checkpoint to resume (whose optimizer state only DeepSpeed reads).
    """
    ds, t = spec.deepspeed, spec.training
    if ds.engine == "deepspeed":
        return "deepspeed", "deepspeed.engine: deepspeed"
    if ds.engine == "fused":
        if world_size > 1:
            from kubetune.trainer.models import ModelError

            raise ModelError(f"spec.deepspeed.engine: the fused engine runs one process, this run has {world_size}; use engine: deepspeed")
        return "fused", "deepspeed.engine: fused"
    reasons = []
    if world_size > 1:
        reasons.append(f"{world_size} processes")
    if not on_gpu or precision not in BF16_WEIGHTS:
        reasons.append(f"{precision} on {'a GPU' if on_gpu else 'CPU'}")
    if t.optimizer not in ("adamw", "adam"):
        reasons.append(f"optimizer {t.optimizer}")
    if ds.zero_stage == 3 or ds.offload_optimizer != "none" or ds.offload_params != "none":
        reasons.append("ZeRO-3 or offload")
    if ds.config:
        reasons.append("deepspeed.config is set")
    if any(not p.is_floating_point() for p in model.parameters()):
        reasons.append("quantized weights")
    if resume_from is not None:
        from kubetune.trainer.fused_engine import is_deepspeed_checkpoint

        from kubetune.trainer.checkpoints import STATE_TAG

        if is_deepspeed_checkpoint(resume_from / STATE_TAG):
            reasons.append(f"resuming DeepSpeed checkpoint {resume_from.name}")
    if reasons:
        return "deepspeed", "; ".join(reasons)
    return "fused", f"one {precision} process on a GPU"


def build_engine(spec: Any, model: torch.nn.Module, groups: list[dict[str, Any]], total_steps: int, world_size: int, precision: str,
                 *, on_gpu: bool | None = None, resume_from: Path | None = None) -> Any:
    """The engine for this process (:func:`engine_kind`) with the optimizer and the LR schedule.

    DeepSpeed: ``deepspeed.initialize`` with the derived config and a torch optimizer. Fused: the
    model cast to bf16 on this process's device under :class:`~kubetune.trainer.fused_engine.FusedEngine`."""

    global LAST_ENGINE_KIND
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    kind, why = engine_kind(spec, world_size, precision, on_gpu, model, resume_from)
    LAST_ENGINE_KIND = kind
    log.info("engine: %s (%s)", kind, why)
    if kind == "fused":
        return _build_fused(spec, model, groups, total_steps, precision, on_gpu)
    import deepspeed

    optimizer = make_optimizer(spec, groups)
    scheduler = make_scheduler(spec, optimizer, total_steps)
    config = deepspeed_config(spec, world_size, precision)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    use_norm_overflow_check(engine)
    if resume_from is not None:
        from kubetune.trainer.checkpoints import STATE_TAG
        from kubetune.trainer.fused_engine import is_fused_checkpoint

        if is_fused_checkpoint(resume_from / STATE_TAG):
            _read_fused_checkpoints(engine)
    return engine


def _read_fused_checkpoints(engine: Any) -> None:
    """Let this DeepSpeed engine's ``load_checkpoint`` read checkpoints of the fused engine too."""
    from kubetune.trainer.fused_engine import is_fused_checkpoint

    deepspeed_load = engine.load_checkpoint

    def load_checkpoint(load_dir: str, tag: str | None = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, **kwargs: Any) -> Any:
        folder = Path(load_dir) / (tag or "")
        if tag is not None and is_fused_checkpoint(folder):
            return load_fused_into_deepspeed(engine, folder, load_optimizer_states=load_optimizer_states,
                                             load_lr_scheduler_states=load_lr_scheduler_states)
        return deepspeed_load(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                              load_lr_scheduler_states=load_lr_scheduler_states, **kwargs)

    engine.load_checkpoint = load_checkpoint


def load_fused_into_deepspeed(engine: Any, folder: Path, *, load_optimizer_states: bool = True,
                              load_lr_scheduler_states: bool = True) -> tuple[str, dict[str, Any]]:
    """Restore a DeepSpeed ZeRO-0/1/2 engine of any process count from a fused-engine checkpoint.

    The fused engine keys its fp32 master weights and Adam moments by parameter name
    (:mod:`kubetune.trainer.fused_engine`); DeepSpeed's ``safe_set_full_*`` API writes each full
    tensor into whatever partition of it this rank owns. Returns what ``load_checkpoint`` returns.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from kubetune.trainer.fused_engine import MODEL_STATES, OPTIM_STATES

    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        raise RuntimeError(f"checkpoint {folder}: written by the fused engine (one process); ZeRO-3 cannot resume it, use zeroStage 2")
    model_states = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=False)
    engine.module.load_state_dict(model_states["module"])
    if load_optimizer_states:
        state = torch.load(folder / OPTIM_STATES, map_location="cpu", weights_only=False)
        _materialise_optimizer_state(engine)
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:
                continue
            if name not in state["master"]:
                raise RuntimeError(f"checkpoint {folder}: no optimizer state for trainable parameter {name}")
            safe_set_full_fp32_param(param, state["master"][name].to(param.device))
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, state[key][name].to(param.device), key)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for per_param in inner.state.values():
            if "step" in per_param:
                if torch.is_tensor(per_param["step"]):
                    per_param["step"].fill_(float(state["step"]))
                else:
                    per_param["step"] = state["step"]
    if load_lr_scheduler_states and engine.lr_scheduler is not None and model_states.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = int(model_states.get("global_steps", 0))
    return str(folder), {}


def _materialise_optimizer_state(engine: Any) -> None:
    """Give a fresh DeepSpeed engine its optimizer state before a resume writes into it.

    torch optimizers create their state (Adam's moments, the step) at their first step, and
    DeepSpeed's ZeRO optimizer links each parameter's fragment of it only then; a run resumed before
    any step has neither, so ``safe_set_full_optimizer_state`` finds nothing to write into. One step
    of the inner optimizer over zero gradients creates both; the load then overwrites every value it
    touched (master weights, moments, step)."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    if inner.state:
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    inner.step()
    for param in params:
        param.grad = None
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def _build_fused(spec: Any, model: torch.nn.Module, groups: list[dict[str, Any]], total_steps: int, precision: str,
                 on_gpu: bool) -> Any:
    from kubetune.trainer.fused_engine import FusedEngine, MasterWeightAdamW

    t = spec.training
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if precision in BF16_WEIGHTS else {"fp16": torch.float16}.get(precision, torch.float32)
    model.to(device=device, dtype=dtype)  # what DeepSpeed's engine does with bf16 enabled
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups if g["params"]]
    if not groups:
        from kubetune.trainer.models import ModelError

        raise ModelError("spec: no parameter is trainable after the techniques' hooks (check peft, techniques.layerSelection and techniques.transferLearning)")
    # KUBETUNE_FUSED_UPDATE=buffers: fp32 gradient buffers and torch's fused AdamW + copy, the step
    # before the one-pass kernel (bench A/B only; the default is the faster, leaner path).
    previous = os.environ.get("KUBETUNE_FUSED_UPDATE", "") == "buffers"
    optimizer = MasterWeightAdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                  decoupled=t.optimizer == "adamw",
                                  grad_buffers=t.gradient_accumulation_steps > 1 or previous,
                                  update="fused" if previous else "auto")
    log.info("fused engine: %s update, %s", optimizer.kernel,
             "fp32 gradient buffers" if optimizer.grad_buffers else "bf16 gradients read in place")
    scheduler = make_scheduler(spec, optimizer, total_steps)
    return FusedEngine(model, optimizer, scheduler, gradient_accumulation_steps=t.gradient_accumulation_steps,
                       max_grad_norm=t.max_grad_norm)


def use_norm_overflow_check(engine: Any) -> bool:
    """Skip a bf16 ZeRO-1/2 step on a non-finite gradient norm instead of DeepSpeed's per-tensor scan.

    DeepSpeed's bf16 overflow check scans every gradient tensor for inf/NaN (one reduction per
    tensor, then a host sync) before it computes the gradient norm for clipping; the norm itself is
    non-finite exactly when some gradient is. With clipping on, the optimizer's step already skips
    on an invalid norm while ``check_grad_overflow`` is set, so the scan is made a no-op on this
    engine's optimizer: the step is skipped (gradients dropped, weights untouched) on the same
    condition, one norm later, without the scan (+2.4% tokens/s, as fast as no check at all, on fixed-length full fine-tuning of a
    1B model on an H100, bench/README.md). Applies only where that holds — bf16 weights, ZeRO stage
    1 or 2 (``DeepSpeedZeroOptimizer``), gradient norm computed, no CPU offload; returns whether it
    did.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = getattr(engine, "optimizer", None)
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return False
    if not (getattr(opt, "check_grad_overflow", False) and getattr(opt, "compute_grad_norm", False)
            and getattr(opt, "dtype", None) == torch.bfloat16 and not getattr(opt, "cpu_offload", True)
            and getattr(opt, "clip_grad", 0.0) > 0.0):
        return False

    def check_overflow(partition_gradients: bool = True) -> None:
        opt.overflow = False  # decided from the gradient norm in step()

    opt.check_overflow = check_overflow
    return True
