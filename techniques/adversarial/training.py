"""Technique 7, adversarial fine-tuning: perturbations of the input embeddings, and NEFTune noise.

``techniques.adversarial`` (:class:`kubetune.techniques.adversarial.AdversarialSpec`). ``prepare_model``
puts a forward hook on the model's input embedding layer; during training forwards (train mode,
gradients on) it adds NEFTune noise, captures the embeddings of the plugin's own clean forward, or
adds a perturbation δ. Evaluation forwards are never touched. Only the first call of the embedding
layer per forward counts (an encoder-decoder embeds the decoder input with the same layer).

``compute_loss`` runs one more forward through the module (not the engine: DeepSpeed hooks the
engine's outputs and would take any backward through them for the step's backward), finds δ with
``torch.autograd.grad`` on that forward's embeddings — the gradient of the embeddings only, every
parameter's ``.grad`` left alone — and returns

    loss + weight · L_adv

so that the loop does one ``engine.backward`` (what DeepSpeed's gradient hooks expect). δ never
touches padding (the attention mask zeroes it), and it is bounded per example by ``epsilon`` in
the chosen ``norm`` (``l2`` over the whole sequence, or ``linf`` per coordinate):

* ``fgm`` (Miyato et al.): δ = ε · g/‖g‖ (``linf``: ε · sign g), g the gradient of the loss
  with respect to the embeddings; L_adv is the loss at embeddings + δ. Three forwards per step.
* ``pgd`` (Madry et al.): ``steps`` ascent steps of size ``stepSize`` from δ = 0, each projected
  back into the ε-ball; L_adv is the loss at the last δ. ``steps`` + 2 forwards.
* ``freelb`` (Zhu et al.): δ₀ random in a ``stepSize`` ball; ``steps`` ascent steps, and L_adv is
  the mean of the losses at δ₀ … δ_{K−1}, all back-propagated ("free" large batch).
* ``neftuneAlpha`` (Jain et al.): uniform noise of scale α/√(L·d) on the embeddings of every
  training forward; works with any method, also ``none``.

``ctx.loss_terms`` gets ``adversarial`` (L_adv) and ``perturbation_norm`` (mean ‖δ‖ per example).
Packed batches are refused by the API (the fused packed loss cannot be re-run on perturbed
embeddings); NEFTune alone works with packing.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.techniques.layers import unwrap


def _per_example_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit step of steepest ascent for ``norm``."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad).clamp(min=1e-12)


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """``delta`` clipped into the ``epsilon``-ball of ``norm`` (per example)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / _per_example_norm(delta).clamp(min=1e-12)).clamp(max=1.0)
    return delta * scale


class Adversarial(Technique):
    name = "adversarial"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.captured: torch.Tensor | None = None
        self.capturing = False
        self.delta: torch.Tensor | None = None
        self.calls = 0
        self.handle: Any = None

    # -- the embedding hook
    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        embedding = unwrap(model).get_input_embeddings()
        self.handle = embedding.register_forward_hook(self._on_embed)
        return model

    def _on_embed(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        self.calls += 1
        if self.calls != 1:
            return None
        alpha = self.config.neftune_alpha
        if alpha:
            magnitude = alpha / (output.shape[-2] * output.shape[-1]) ** 0.5
            output = output + torch.empty_like(output).uniform_(-magnitude, magnitude)
        if self.delta is not None:
            return output + self.delta.to(output.dtype)
        if not self.capturing:
            return output
        if not output.requires_grad:
            # A frozen embedding layer (LoRA, probing, layer selection): make its output a leaf
            # of the graph so the loss can still be differentiated with respect to it.
            output = output.detach().requires_grad_(True)
        self.captured = output
        return output

    # -- the loss
    def _loss_at(self, model: Any, inputs: dict, delta: torch.Tensor) -> torch.Tensor:
        self.delta, self.calls = delta, 0
        try:
            return model(**inputs).loss
        finally:
            self.delta, self.calls = None, 0

    def compute_loss(self, ctx: TechniqueContext, model: Any, batch: dict, outputs: Any, loss: Any) -> Any:
        from kubetune.trainer.batching import model_inputs

        self.calls = 0
        c = self.config
        if c.method == "none" or not loss.requires_grad:
            return loss
        inputs = model_inputs(batch, ctx.device)
        # The gradient with respect to the embeddings comes from a forward of our own through the
        # module: DeepSpeed hooks the engine's outputs and treats any backward through them as
        # the step's one backward.
        self.capturing, self.calls = True, 0
        try:
            clean = model(**inputs).loss
        finally:
            self.capturing, self.calls = False, 0
        embeds, self.captured = self.captured, None
        if embeds is None:
            return loss
        mask = inputs["attention_mask"].unsqueeze(-1).to(embeds.dtype) if "attention_mask" in inputs else torch.ones_like(embeds[..., :1])
        if embeds.shape[:2] != mask.shape[:2]:  # prompt/prefix methods prepend virtual tokens elsewhere
            mask = torch.ones_like(embeds[..., :1])
        grad = torch.autograd.grad(clean, embeds)[0].float() * mask
        if c.method == "fgm":
            delta = (c.epsilon * ascent_direction(grad, c.norm) * mask).detach()
            adversarial = self._loss_at(model, inputs, delta)
        elif c.method == "pgd":
            delta = project(c.step_size * ascent_direction(grad, c.norm) * mask, c.epsilon, c.norm).detach()
            for _ in range(c.steps - 1):
                delta.requires_grad_(True)
                step_loss = self._loss_at(model, inputs, delta)
                g = torch.autograd.grad(step_loss, delta)[0] * mask
                delta = project(delta.detach() + c.step_size * ascent_direction(g, c.norm) * mask, c.epsilon, c.norm).detach()
            adversarial = self._loss_at(model, inputs, delta)
        else:  # freelb
            noise = torch.empty_like(grad).uniform_(-1.0, 1.0) * mask
            if c.norm == "l2":
                noise = c.step_size * ascent_direction(noise, "l2") * mask
            else:
                noise = noise * c.step_size
            delta = project(noise, c.epsilon, c.norm).detach()
            total = torch.zeros((), device=grad.device)
            for k in range(c.steps):
                delta.requires_grad_(True)
                step_loss = self._loss_at(model, inputs, delta)
                total = total + step_loss / c.steps
                if k < c.steps - 1:
                    g = torch.autograd.grad(step_loss, delta, retain_graph=True)[0] * mask
                    delta = project(delta.detach() + c.step_size * ascent_direction(g, c.norm) * mask, c.epsilon, c.norm).detach()
            adversarial = total
        ctx.loss_terms["adversarial"] = float(adversarial.detach())
        ctx.loss_terms["perturbation_norm"] = float(_per_example_norm(delta.detach().float()).mean())
        return loss + c.weight * adversarial

    def describe(self, ctx: TechniqueContext) -> str | None:
        c = self.config
        parts = []
        if c.method != "none":
            term = ctx.loss_terms.get("adversarial")
            parts.append(f"{c.method} (epsilon {c.epsilon:g})" + (f", last adversarial term {term:.4g}" if term is not None else ""))
        if c.neftune_alpha is not None:
            parts.append(f"NEFTune noise alpha {c.neftune_alpha:g}")
        return "; ".join(parts)
