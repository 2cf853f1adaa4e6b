"""The fused single-process engine: bf16 weights, fp32 master copies, one fused AdamW, no DeepSpeed.

On one GPU DeepSpeed's bf16 ZeRO-1/2 step is the largest cost left after the matrix products
(bench/README.md: ~35 ms of a 281 ms step for a 1B model): every step it converts each gradient
to fp32 and flattens it into a partition, runs the optimizer over the flat copy, then copies the
result back into the bf16 weights, with host syncs in between. With one process there is nothing
to partition, so :class:`FusedEngine` keeps the same numerics without the copies:

* the model stays in bf16 (as under DeepSpeed); each trainable parameter has an fp32 master copy
  and Adam moments in fp32, held by :class:`MasterWeightAdamW`;
* with gradient accumulation (``gradient_accumulation_steps`` > 1) each parameter also has an
  fp32 gradient buffer: a hook after each parameter's gradient is accumulated adds it into its
  buffer and frees the bf16 gradient, during backward (micro-batches sum in fp32). Without
  accumulation there is no buffer: the bf16 gradient autograd leaves in ``param.grad`` is read
  directly by the step and freed after it (4 bytes per parameter less memory, no conversion pass);
* at the step: one ``_foreach_norm`` (accumulated in fp32) for the global gradient norm, clipping
  and the non-finite check as device scalars ``grad_scale``/``found_inf`` (no host sync: a
  non-finite norm skips the update on the device, as DeepSpeed's bf16 step does), then on a CUDA
  device one pass per parameter of :mod:`kubetune.trainer.adam_kernel` (reads gradient, master
  and moments, writes master, moments and the bf16 weight). Without Triton the same update runs
  as ``torch._fused_adamw_`` over the fp32 masters and one ``_foreach_copy_`` back into the bf16
  weights, or as foreach ops where there is no fused kernel for the device.

Hand-written rather than ``torch.optim.AdamW(fused=True)``: torch's fused AdamW needs the gradient
and the parameter in one dtype, and running it on the bf16 weights would lose the fp32 master
weights (bf16 cannot represent a 1e-5-scale update of a weight near 1).

The engine offers what the training loop and the checkpoints use of a DeepSpeed engine
(``module``, ``backward``, ``step``, ``train``, ``get_lr``, ``compile``, ``save_checkpoint``,
``load_checkpoint``); :func:`kubetune.trainer.engines.build_engine` picks it (see
``deepspeed.engine`` in the spec). Checkpoint layout, in the same ``state/`` folder DeepSpeed
uses::

    state/mp_rank_00_model_states.pt   {"module": the bf16 state dict, "lr_scheduler": ..., "engine": "fused", ...}
                                       (DeepSpeed's file name and "module" key: weights load the usual way)
    state/fused_optim_states.pt        fp32 master weights, exp_avg, exp_avg_sq keyed by parameter name, the step

Keyed by name, the optimizer state is independent of how many processes wrote it;
:func:`kubetune.trainer.engines.load_fused_into_deepspeed` loads it into a DeepSpeed engine (a run
that resumes on more GPUs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "fused_optim_states.pt"


def is_fused_checkpoint(state_dir: Path) -> bool:
    """Whether ``state_dir`` (a checkpoint's ``state/``) was written by :class:`FusedEngine`."""
    return (state_dir / OPTIM_STATES).exists()


def is_deepspeed_checkpoint(state_dir: Path) -> bool:
    """Whether ``state_dir`` holds DeepSpeed optimizer files (ZeRO partitions or a stage-0 state)."""
    return state_dir.is_dir() and not is_fused_checkpoint(state_dir) and (state_dir / MODEL_STATES).exists()


class MasterWeightAdamW(torch.optim.Optimizer):
    """Adam(W) over fp32 master copies of low-precision parameters (see the module doc).

    ``param_groups`` hold the model's own (bf16) parameters, so LR schedules and techniques see the
    usual optimizer; the per-parameter state holds ``master``, ``exp_avg``, ``exp_avg_sq`` and, with
    ``grad_buffers`` (gradient accumulation), the fp32 gradient buffer ``grad``. :meth:`step` reads
    the gradients from those buffers, or without them from ``param.grad`` in the parameter's dtype.
    ``decoupled`` selects AdamW (decoupled weight decay) or Adam (L2 in the gradient).

    ``update`` picks the kernel: ``auto`` is the one-pass Triton kernel of
    :mod:`kubetune.trainer.adam_kernel` on a CUDA device, else ``torch._fused_adamw_`` then a copy
    into the weights (``fused``), else foreach ops (``foreach``).
    """

    UPDATES = ("auto", "triton", "fused", "foreach")

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = True, grad_buffers: bool = True,
                 update: str = "auto") -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if update not in self.UPDATES:
            raise ValueError(f"update: must be one of {', '.join(self.UPDATES)}, got {update!r}")
        self.decoupled = decoupled
        self.grad_buffers = grad_buffers
        device = None
        for group in self.param_groups:
            for p in group["params"]:
                device = p.device
                self.state[p] = {
                    "master": p.detach().to(torch.float32, copy=True),
                    "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
                }
                if grad_buffers:
                    self.state[p]["grad"] = torch.zeros_like(p, dtype=torch.float32)
        # One step counter for every tensor (the kernels only read it): float32 on the device.
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        from kubetune.trainer import adam_kernel

        contiguous = all(p.is_contiguous() for g in self.param_groups for p in g["params"])
        self._triton = update in ("auto", "triton") and adam_kernel.available(device) and contiguous
        if update == "triton" and not self._triton:
            raise ValueError("update: triton needs contiguous parameters on a CUDA device and Triton installed")
        self._fused = update in ("auto", "fused") and self._fused_available(device)

    @property
    def kernel(self) -> str:
        """The update that :meth:`step` runs: ``triton``, ``fused`` or ``foreach``."""
        return "triton" if self._triton else "fused" if self._fused else "foreach"

    @staticmethod
    def _fused_available(device: torch.device | None) -> bool:
        if device is None:
            return False
        probe = [torch.zeros(2, device=device)]
        try:
            torch._fused_adamw_(probe, [torch.zeros(2, device=device)], [torch.zeros(2, device=device)],
                                [torch.zeros(2, device=device)], [], [torch.ones((), device=device)],
                                lr=0.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        except (RuntimeError, NotImplementedError, AttributeError):
            return False
        return True

    def _tensors(self, group: dict[str, Any], key: str) -> list[torch.Tensor]:
        return [self.state[p][key] for p in group["params"]]

    def _grads(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """This step's gradients: the fp32 buffers, or each ``param.grad`` (zeros where none arrived)."""
        if self.grad_buffers:
            return self._tensors(group, "grad")
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in group["params"]]

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients, accumulated in fp32 (a device scalar, no host sync)."""
        grads = [g for group in self.param_groups for g in self._grads(group)]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=self.step_count.device)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))

    @torch.no_grad()
    def step(self, closure: Any = None, *, max_grad_norm: float | None = None) -> torch.Tensor:  # type: ignore[override]
        """One update from this step's gradients; returns the gradient norm before clipping.

        The update is skipped (weights, moments and step count untouched) when the norm is not
        finite. With ``max_grad_norm`` the gradients are scaled by ``max_grad_norm / (norm + 1e-6)``
        where that is below 1 (DeepSpeed's and ``clip_grad_norm_``'s rule). Without gradient
        buffers the caller frees ``param.grad`` afterwards (:meth:`FusedEngine.step` does).
        """
        norm = self.grad_norm()
        found_inf = (~torch.isfinite(norm)).to(torch.float32)
        if max_grad_norm is not None:
            grad_scale = torch.clamp((norm + 1e-6) / max_grad_norm, min=1.0)
        else:
            grad_scale = torch.ones((), dtype=torch.float32, device=norm.device)
        grad_scale = torch.where(found_inf > 0, torch.ones_like(grad_scale), grad_scale)  # no inf/nan scale
        self.step_count.add_(1.0 - found_inf)
        for group in self.param_groups:
            if not group["params"]:
                continue
            masters, grads = self._tensors(group, "master"), self._grads(group)
            avgs, sqs = self._tensors(group, "exp_avg"), self._tensors(group, "exp_avg_sq")
            beta1, beta2 = group["betas"]
            if self._triton:
                from kubetune.trainer.adam_kernel import adam_update

                adam_update(list(group["params"]), grads, masters, avgs, sqs, step=self.step_count, grad_scale=grad_scale,
                            found_inf=found_inf, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], decoupled=self.decoupled)
                continue
            grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
            if self._fused:
                kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
                kernel(masters, grads, avgs, sqs, [], [self.step_count] * len(masters), lr=float(group["lr"]),
                       beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                       maximize=False, grad_scale=grad_scale, found_inf=found_inf)
            else:
                self._foreach_update(group, masters, grads, avgs, sqs, grad_scale, found_inf)
            torch._foreach_copy_(list(group["params"]), masters)
        return norm

    def _foreach_update(self, group: dict[str, Any], masters: list[torch.Tensor], grads: list[torch.Tensor],
                        avgs: list[torch.Tensor], sqs: list[torch.Tensor], grad_scale: torch.Tensor,
                        found_inf: torch.Tensor) -> None:
        """The same update as the fused kernel, as foreach ops (devices without the kernel)."""
        if bool(found_inf.item()):
            return
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        step = float(self.step_count.item())
        g = torch._foreach_div(grads, grad_scale)
        if wd and self.decoupled:
            torch._foreach_mul_(masters, 1.0 - lr * wd)
        elif wd:
            torch._foreach_add_(g, masters, alpha=wd)
        torch._foreach_lerp_(avgs, g, 1.0 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, g, g, value=1.0 - beta2)
        bias1 = 1.0 - beta1**step
        bias2 = 1.0 - beta2**step
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, bias2**0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(masters, avgs, denom, value=-lr / bias1)


class FusedEngine:
    """A DeepSpeed-engine-shaped wrapper for one process (see the module doc)."""

    kind = "fused"

    def __init__(self, model: torch.nn.Module, optimizer: MasterWeightAdamW, lr_scheduler: Any, *,
                 gradient_accumulation_steps: int = 1, max_grad_norm: float | None = None) -> None:
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.global_steps = 0
        self.micro_steps = 0
        self.last_grad_norm: torch.Tensor | None = None
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._touched: set[int] = set()
        if optimizer.grad_buffers:  # without buffers the gradients stay in param.grad until the step
            for p in self._params:
                p.register_post_accumulate_grad_hook(self._accumulate)

    def _accumulate(self, param: torch.Tensor) -> None:
        buffer = self.optimizer.state[param]["grad"]
        assert param.grad is not None
        if id(param) in self._touched:
            buffer.add_(param.grad)
        else:
            buffer.copy_(param.grad)
            self._touched.add(id(param))
        param.grad = None

    # -- what the training loop calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> FusedEngine:
        self.module.train(mode)
        return self

    def eval(self) -> FusedEngine:
        return self.train(False)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        self.module.compile(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` divided by the accumulation steps (as DeepSpeed's engine does)."""
        if self.gradient_accumulation_steps > 1:
            loss = loss / self.gradient_accumulation_steps
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def step(self) -> None:
        """Called after every micro-batch; updates the weights at the accumulation boundary."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.optimizer.grad_buffers:
            for p in self._params:
                if id(p) not in self._touched:  # no gradient reached it in this step
                    self.optimizer.state[p]["grad"].zero_()
            self._touched.clear()
        self.last_grad_norm = self.optimizer.step(max_grad_norm=self.max_grad_norm)
        if not self.optimizer.grad_buffers:
            for p in self._params:
                p.grad = None
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return None if self.last_grad_norm is None else float(self.last_grad_norm)

    # -- checkpoints

    def optimizer_state(self) -> dict[str, Any]:
        """Masters, moments and hyper-parameters keyed by parameter name, on the CPU."""
        opt = self.optimizer
        out: dict[str, Any] = {"engine": self.kind, "step": int(opt.step_count.item()), "param_groups": [],
                               "master": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for group in opt.param_groups:
            names = [self._names[id(p)] for p in group["params"]]
            out["param_groups"].append({"names": names, **{k: v for k, v in group.items() if k != "params"}})
            for name, p in zip(names, group["params"]):
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    out[key][name] = opt.state[p][key].detach().cpu()
        return out

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        opt = self.optimizer
        missing = [self._names[id(p)] for p in self._params if self._names[id(p)] not in state["master"]]
        if missing:
            raise RuntimeError(f"the checkpoint's optimizer state has no entry for {len(missing)} trainable parameters "
                               f"(first: {missing[0]}); it was written for another set of trainable parameters")
        with torch.no_grad():
            for p in self._params:
                name = self._names[id(p)]
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    opt.state[p][key].copy_(state[key][name])
                p.copy_(opt.state[p]["master"])
        opt.step_count.fill_(float(state["step"]))
        for group, saved in zip(opt.param_groups, state.get("param_groups", [])):
            for key, value in saved.items():
                if key not in ("names", "params"):
                    group[key] = value

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True, **_: Any) -> bool:
        folder = Path(save_dir) / (tag or f"global_step{self.global_steps}")
        folder.mkdir(parents=True, exist_ok=True)
        model_states = {
            "module": self.module.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "engine": self.kind, "global_steps": self.global_steps, "dp_world_size": 1, "mp_world_size": 1,
            **(client_state or {}),
        }
        torch.save(model_states, folder / MODEL_STATES)
        torch.save(self.optimizer_state(), folder / OPTIM_STATES)
        if save_latest:
            (Path(save_dir) / "latest").write_text(folder.name)
        return True

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, **_: Any) -> tuple[str | None, dict[str, Any]]:
        if tag is None:
            latest = Path(load_dir) / "latest"
            if not latest.exists():
                return None, {}
            tag = latest.read_text().strip()
        folder = Path(load_dir) / tag
        if not (folder / MODEL_STATES).exists():
            return None, {}
        model_states = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=False)
        self.module.load_state_dict(model_states["module"], strict=load_module_strict)
        with torch.no_grad():  # the masters follow the loaded weights unless the optimizer state replaces them
            for p in self._params:
                self.optimizer.state[p]["master"].copy_(p)
        if load_optimizer_states and not load_module_only:
            if not is_fused_checkpoint(folder):
                raise RuntimeError(
                    f"checkpoint {folder}: written by DeepSpeed, whose optimizer state the fused engine does not read; "
                    "resume it with spec.deepspeed.engine: deepspeed"
                )
            self.load_optimizer_state(torch.load(folder / OPTIM_STATES, map_location="cpu", weights_only=False))
        if load_lr_scheduler_states and not load_module_only and self.lr_scheduler is not None and model_states.get("lr_scheduler"):
            self.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
        self.global_steps = int(model_states.get("global_steps", 0))
        client = {k: v for k, v in model_states.items() if k not in ("module", "lr_scheduler")}
        return str(folder), client
