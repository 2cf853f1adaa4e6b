"""The optimizer and the learning-rate schedule of a run, from ``spec.training``.

Called by the engines (``kubetune.trainer.engines``) once the technique hooks have shaped the
parameter groups (:func:`default_param_groups` is where they start). A torch optimizer, so DeepSpeed
never JIT-compiles its fused Adam; the fused CUDA kernel where a GPU holds the master weights.
"""

from __future__ import annotations

from typing import Any

import torch

_SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant-with-warmup": "constant_with_warmup",
    "inverse-sqrt": "inverse_sqrt",
}


def default_param_groups(model: torch.nn.Module, spec: Any) -> list[dict[str, Any]]:
    """One group with every trainable parameter at the peak learning rate, no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": params, "param_names": names, "lr": spec.training.learning_rate, "weight_decay": 0.0, "name": "default"}]


def make_optimizer(spec: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    t = spec.training
    # The fused CUDA kernel updates all tensors of a group in a few launches (DeepSpeed hands it its
    # fp32 master partitions, on the GPU unless the optimizer is offloaded).
    fused = torch.cuda.is_available() and spec.deepspeed.offload_optimizer == "none"
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups if g["params"]]
    if not groups:
        from kubetune.trainer.models import ModelError

        raise ModelError("spec: no parameter is trainable after the techniques' hooks (check peft, techniques.layerSelection and techniques.transferLearning)")
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=fused or None)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=fused or None)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, momentum=t.adam_beta1)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=t.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)


def make_scheduler(spec: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    t = spec.training
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * total_steps))
    return get_scheduler(_SCHEDULERS[t.lr_scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
