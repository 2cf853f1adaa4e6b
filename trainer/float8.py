"""FP8 training (``training.precision: fp8``): torchao's float8 linear layers where they pay.

Called by the training loop (:mod:`kubetune.trainer.training`): :func:`check_support` when the
precision is resolved (before anything is loaded), :func:`convert` once the techniques have shaped
the model and its parameter groups, before the engine is built. An fp8 run is a bf16 run in every
other respect (weights, DeepSpeed's ``bf16`` section or the fused engine, fp32 master weights):
only the matrix products of the converted linear layers run in float8.

The float8 arithmetic is torchao's (``torchao.float8.convert_to_float8_training``): each converted
``nn.Linear`` becomes a ``Float8Linear`` holding the same weight and bias ``Parameter`` objects (so
parameter groups, checkpoints and the export see the same tensors under the same names) and casts
input, weight and output gradient to float8 with one dynamic scale per tensor (the ``tensorwise``
recipe: torchao's fastest on H100; ``rowwise`` scales are more accurate and slower). The casts are
cheap only inside ``torch.compile``, which is why fp8 turns the trainer's per-layer compile on by
default (``training.compile`` unset).

The filter (:func:`eligible`) is ours, because which layers to leave alone depends on the trainer:

* only plain ``torch.nn.Linear`` (not a quantized subclass, not one converted already);
* never the output head (``get_output_embeddings()``, the lm_head): the fused loss reads its
  weight directly, and the vocabulary projection is the most precision-sensitive product;
* only trainable layers: torchao's backward computes the weight gradient of a frozen weight too,
  so a frozen layer would do more matrix work in float8, not less (this is also why fp8 is
  refused with a peft method, ``kubetune.api.rules``);
* only layers whose in and out features are multiples of 16 (what the float8 matrix product
  ``torch._scaled_mm`` requires).

The refusals are one line each, raised as :class:`~kubetune.trainer.models.ModelError` (exit 2):
on CPU, on a GPU without FP8 tensor cores (compute capability below 8.9), and without torchao
(the ``gpu`` extra).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("kubetune.trainer")

#: The scaling recipe handed to torchao (see the module doc for the choice).
RECIPE = "tensorwise"
#: FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer.
MIN_CAPABILITY = (8, 9)


def check_support(on_gpu: bool, device: int | None = None) -> None:
    """Refuse, with one line naming ``spec.training.precision``, a process that cannot train in fp8."""
    from kubetune.trainer.models import ModelError

    if not on_gpu:
        raise ModelError("spec.training.precision: fp8 needs a GPU with FP8 tensor cores (compute capability >= 8.9, "
                         "e.g. H100, L4) and this machine has none; use bf16 or fp32 on CPU")
    index = torch.cuda.current_device() if device is None else device
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise ModelError(f"spec.training.precision: fp8 needs FP8 tensor cores (compute capability >= 8.9, e.g. H100, L4); "
                         f"{name} has {capability[0]}.{capability[1]}; use precision bf16")
    _torchao_float8()


def _torchao_float8() -> Any:
    """``torchao.float8``, or a one-line refusal that says which extra installs it."""
    from kubetune.trainer.models import ModelError

    try:
        import torchao.float8 as float8
    except ImportError as exc:
        raise ModelError("spec.training.precision: fp8 trains through torchao's float8 linear layers and torchao is not "
                         f"installed ({exc}); install the gpu extra (pip install 'kubetune[gpu]': the torchao release built for your torch) "
                         "or use precision bf16") from None
    return float8


def eligible(model: torch.nn.Module) -> Callable[[torch.nn.Module, str], bool]:
    """The module filter for ``convert_to_float8_training`` on ``model`` (rules in the module doc)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        if type(module) is not torch.nn.Linear or module is head:
            return False
        if not module.weight.requires_grad:
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return keep


def plan(model: torch.nn.Module) -> list[str]:
    """The names of the linear layers :func:`convert` turns into float8 layers, in module order."""
    keep = eligible(model)
    return [name for name, module in model.named_modules() if keep(module, name)]


def tokens_aligned(training: Any) -> bool:
    """Whether every training micro-batch of ``training`` (the spec block) holds a multiple of 16 tokens.

    The weight gradient multiplies over the tokens, so ``torch._scaled_mm`` needs their count to be
    a multiple of 16 too: packed micro-batches are (the token budget, when it is one, or a multiple
    of 256 under ``packingMaxExamples``); padded ones are as long as their longest row.
    """
    if not training.packing:
        return False
    return training.packing_max_examples is not None or (training.micro_batch_size * training.max_seq_length) % 16 == 0


def convert(model: torch.nn.Module, *, pad_inner_dim: bool = False, emulate: bool = False) -> list[str]:
    """Swap ``model``'s eligible linear layers for torchao's ``Float8Linear`` in place; returns their names.

    Weights and biases stay the same ``Parameter`` objects (the parameter groups built before
    still hold them); nothing else in the model changes. ``pad_inner_dim``: torchao zero-pads the
    inner dimension of each float8 product to a multiple of 16 (a copy per product; needed when the
    micro-batches' token counts are not multiples of 16, :func:`tokens_aligned`). ``emulate``:
    torchao's emulated float8 products, same casts and scales without FP8 hardware (CPU tests).
    """
    float8 = _torchao_float8()
    names = plan(model)
    wanted = set(names)
    config = float8.Float8LinearConfig.from_recipe_name(RECIPE)
    if pad_inner_dim or emulate:
        import dataclasses

        config = dataclasses.replace(config, pad_inner_dim=pad_inner_dim, emulate=emulate)
    float8.convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn in wanted, config=config)
    log.info("fp8: %d linear layers in float8 (torchao %s scaling); %d kept in bf16", len(names), RECIPE,
             sum(1 for _, m in model.named_modules() if type(m) is torch.nn.Linear))
    return names
