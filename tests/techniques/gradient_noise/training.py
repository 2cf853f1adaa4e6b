"""The trainer plugin of the gradient-noise fixture: a hook on every trainable weight's gradient."""

from __future__ import annotations

from typing import Any

import torch

from kubetune.trainer.techniques.base import Technique, TechniqueContext


class GradientNoise(Technique):
    name = "gradientNoise"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.noised = 0

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        generator = torch.Generator().manual_seed(self.config.seed)

        def add_noise(grad: torch.Tensor) -> torch.Tensor:
            self.noised += 1
            noise = torch.randn(grad.shape, generator=generator, dtype=torch.float32) * self.config.std
            return grad + noise.to(device=grad.device, dtype=grad.dtype)

        for param in model.parameters():
            if param.requires_grad:
                param.register_hook(add_noise)
        return model

    def describe(self, ctx: TechniqueContext) -> str | None:
        return f"noise of std {self.config.std:g} added to {self.noised} gradients"
