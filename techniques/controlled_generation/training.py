"""Technique 9 · controlled generation: control codes, and DPO on preference data.

**Control codes** (``controlGeneration.controlCodes``): every example whose row has an attribute
(column ``field``, or the dataset's ``fields.attribute``) gets the code ``format.format(value=…)``
and a space in front of its input (``inputs.prepend``), at training and evaluation alike. Listed
``values`` become special tokens of the tokenizer (one token each; the loop resizes the
embeddings, and ``prepare_model`` does so too if the model is still short of rows) and are saved
with it. At generation time the same prefix steers the output: :func:`control_prompt` builds it.
Rows without the attribute train unconditioned, which is what generation without a code draws on;
when no row at all has it, the field name is wrong and the run stops with an error.

**DPO** (``dpo``): on ``preference`` data (prompt, chosen, rejected) the loss is replaced by the
direct preference optimisation loss. With ``πθ`` the policy and ``πref`` the reference (the initial
model: a frozen copy for full fine-tuning, the base with adapters disabled under PEFT), the
per-pair log-ratio is ``h = [log πθ(c) − log πθ(r)] − [log πref(c) − log πref(r)]`` (sums over
response tokens) and

=========  ==============================================================
sigmoid    −(1−ε)·log σ(β·h) − ε·log σ(−β·h)   (ε = ``labelSmoothing``)
ipo        (h − 1/(2β))²
hinge      max(0, 1 − β·h)
=========  ==============================================================

Loss terms ``dpo_loss``, ``dpo_margin`` (mean β·h), ``dpo_accuracy`` go to the progress log. After
each evaluation the eval metrics gain ``eval_logp_margin`` (mean log πθ(c) − log πθ(r) on the eval
pairs), ``eval_dpo_margin`` (mean h) and ``eval_dpo_accuracy`` (share of pairs with h > 0).
"""

from __future__ import annotations

import copy
from typing import Any

from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.techniques.inputs import prepend

IGNORE_INDEX = -100


def control_code(config: Any, value: Any) -> str:
    """The control code of an attribute value, e.g. ``<positive>``."""
    return config.format.format(value=value)


def control_prompt(config: Any, value: Any, prompt: str = "") -> str:
    """The text to generate from for attribute ``value``: the code, a space, then ``prompt``."""
    return f"{control_code(config, value)} {prompt}"


def sequence_logps(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
    """Sum of the log-probabilities of the labelled tokens of each row (virtual tokens skipped)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -labels.shape[1] :]  # prompt/prefix tuning prepend virtual positions
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(h: Any, beta: float, loss_type: str, label_smoothing: float) -> Any:
    """Per-pair DPO loss from the log-ratio difference ``h`` (see the module doc)."""
    import torch.nn.functional as F

    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return F.relu(1.0 - beta * h)
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _pairs(batch: dict[str, Any], device: Any) -> tuple[Any, Any, Any, int]:
    """Chosen and rejected rows stacked into one padded batch (one forward for both)."""
    import torch

    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    width = max(c_ids.shape[1], r_ids.shape[1])

    def pad(t: Any, value: int) -> Any:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(c_ids, 0), pad(r_ids, 0)]).to(device)
    mask = torch.cat([pad(batch["chosen_attention_mask"], 0), pad(batch["rejected_attention_mask"], 0)]).to(device)
    labels = torch.cat([pad(batch["chosen_labels"], IGNORE_INDEX), pad(batch["rejected_labels"], IGNORE_INDEX)]).to(device)
    return ids, mask, labels, c_ids.shape[0]


class ControlledGeneration(Technique):
    """Control codes on the input; DPO in place of the language-modelling loss."""

    name = "controlledGeneration"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.reference: Any = None
        self.policy: Any = None

    # -- control codes
    def attribute_column(self, example: dict[str, Any]) -> str:
        for i, ds in enumerate(self.spec.data.datasets):
            if (ds.name or f"dataset-{i}") == example.get("_dataset") and ds.fields is not None and ds.fields.attribute:
                return ds.fields.attribute
        return self.config.control_codes.field

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        codes = self.config.control_codes
        if codes is None:
            return examples
        if codes.values and ctx.tokenizer is not None:
            specials = [control_code(codes, v) for v in codes.values]
            missing = [s for s in specials if s not in ctx.tokenizer.get_vocab()]
            if missing:
                ctx.tokenizer.add_tokens(missing, special_tokens=True)
        out, coded = [], 0
        for e in examples:
            value = e.get(self.attribute_column(e))
            if value is None or value == "":
                out.append(e)
                continue
            if codes.values and str(value) not in codes.values:
                raise ValueError(
                    f"{e.get('_origin', '?')}: row {e.get('_row', '?')}, field {self.attribute_column(e)!r}: attribute {value!r} is not "
                    f"one of spec.techniques.controlledGeneration.controlCodes.values {codes.values}"
                )
            out.append(prepend(e, control_code(codes, value) + " "))
            coded += 1
        if examples and not coded and split == "train":
            raise ValueError(
                f"spec.techniques.controlledGeneration.controlCodes.field: no training row has a value in column "
                f"{codes.field!r}; set field (or the dataset's fields.attribute) to the column holding the attribute"
            )
        ctx.state.setdefault(self.name, {})[f"coded_{split}"] = coded
        return out

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        tok = ctx.tokenizer
        if self.config.control_codes is not None and tok is not None:
            embeddings = model.get_input_embeddings()
            if embeddings is not None and embeddings.num_embeddings < len(tok):
                model.resize_token_embeddings(len(tok))
        if self.config.dpo is not None:
            self.policy = model
            if self.spec.peft.method == "full":
                self.reference = copy.deepcopy(model).eval()
                for p in self.reference.parameters():
                    p.requires_grad_(False)
        return model

    # -- DPO
    def _reference_logps(self, model: Any, ids: Any, mask: Any, labels: Any) -> Any:
        import torch

        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, ids, mask, labels)
            with model.disable_adapter():
                return sequence_logps(model, ids, mask, labels)

    def pair_logratios(self, model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
        """(policy chosen−rejected log-prob margin, h) for each pair of ``batch``."""
        ids, mask, labels, n = _pairs(batch, device)
        policy = sequence_logps(model, ids, mask, labels)
        reference = self._reference_logps(model, ids, mask, labels)
        margin = policy[:n] - policy[n:]
        return margin, margin - (reference[:n] - reference[n:])

    def compute_loss(self, ctx: TechniqueContext, model: Any, batch: dict, outputs: Any, loss: Any) -> Any:
        dpo = self.config.dpo
        if dpo is None or "chosen_input_ids" not in batch:
            return loss
        _, h = self.pair_logratios(model, batch, ctx.device or "cpu")
        losses = dpo_loss(h, dpo.beta, dpo.loss_type, dpo.label_smoothing)
        ctx.loss_terms.update(
            dpo_loss=float(losses.mean().detach()),
            dpo_margin=float((dpo.beta * h).mean().detach()),
            dpo_accuracy=float((h > 0).float().mean()),
        )
        return losses.mean()

    def on_evaluate(self, ctx: TechniqueContext, metrics: dict[str, float]) -> None:
        if self.config.dpo is None:
            return
        dataset = (getattr(ctx, "datasets", None) or {}).get("eval")
        model = getattr(ctx, "model", None)
        if dataset is None or model is None or not len(dataset):
            return
        import torch

        from kubetune.trainer.batching import micro_batches

        was_training = model.training
        model.eval()
        margins, hs = [], []
        with torch.no_grad():
            for chunk in micro_batches(list(range(len(dataset))), ctx.micro_batch_size or 8):
                batch = ctx.collate([dataset[i] for i in chunk])
                margin, h = self.pair_logratios(model, batch, ctx.device or "cpu")
                margins.append(margin.cpu())
                hs.append(h.cpu())
        if was_training:
            model.train()
        margin, h = torch.cat(margins), torch.cat(hs)
        metrics.update(
            eval_logp_margin=float(margin.mean()), eval_dpo_margin=float(h.mean()), eval_dpo_accuracy=float((h > 0).float().mean())
        )

    def describe(self, ctx: TechniqueContext) -> str | None:
        state = ctx.state.get(self.name, {})
        parts = []
        if self.config.control_codes is not None:
            parts.append(f"control codes on {state.get('coded_train', 0)} training examples")
        if self.config.dpo is not None:
            parts.append(f"DPO ({self.config.dpo.loss_type}, beta {self.config.dpo.beta:g})")
        return "; ".join(parts)
