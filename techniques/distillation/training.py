"""Technique 6, knowledge distillation: a teacher's softened logits guide the student.

``techniques.distillation`` (:class:`kubetune.techniques.distillation.DistillationSpec`). The teacher is
loaded in ``prepare_model`` from ``teacher.source`` (same schemes as ``model.source``) under the
student's head, in eval mode with no gradients, on every process beside the student — it is kept
outside the module DeepSpeed wraps, so it is neither trained, sharded nor checkpointed. The loss
of each micro-batch (``compute_loss``) is

    loss = alpha · CE(student, labels) + (1 − alpha) · T² · KL(softmax(teacher/T) ‖ softmax(student/T))

with the KL summed over classes and averaged over the positions that carry a label: every
example for sequence classification, labelled tokens for token classification and seq2seq, the
next-token targets (labels shifted by one) for a causal LM. The CE term is the loop's loss, or
the label-smoothed one when a technique publishes ``ctx.label_smoothing`` (regularisation does):
this technique declares ``PROVIDES_TASK_LOSS``, so it smooths its own CE term. ``T²`` keeps the
soft-target gradients on the scale of the hard ones (Hinton et al., 2015). ``ctx.loss_terms``
gets ``ce`` and ``kl`` (the unweighted KL at temperature T).

Teacher and student must share a tokenizer: the same token ids must mean the same strings, or the
logits are not comparable. The teacher folder's tokenizer is compared with the student's (the
vocabulary and the special tokens); any difference is a :class:`kubetune.api.SpecError` on
``spec.techniques.distillation.teacher.source`` that says what differs. A classification teacher
must have as many labels as the student. Packed batches keep no logits (``outputs`` is None); the
student is then run again unpacked — correct, but packing saves nothing with distillation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kubetune.api import Problem, SpecError
from kubetune.trainer.losses import aligned, hard_loss
from kubetune.trainer.techniques.base import Technique, TechniqueContext

WHERE = "spec.techniques.distillation.teacher"


def tokenizer_difference(student: Any, teacher: Any) -> str | None:
    """Why two tokenizers do not map ids to the same strings, or None when they do."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        only_student = sorted(set(sv) - set(tv))
        only_teacher = sorted(set(tv) - set(sv))
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])
        detail = [f"the student's vocabulary has {len(sv)} tokens, the teacher's {len(tv)}"]
        if only_student:
            detail.append(f"{len(only_student)} only in the student's (e.g. {only_student[:3]})")
        if only_teacher:
            detail.append(f"{len(only_teacher)} only in the teacher's (e.g. {only_teacher[:3]})")
        if moved:
            detail.append(f"{len(moved)} with other ids (e.g. {moved[0]!r}: {sv[moved[0]]} vs {tv[moved[0]]})")
        return "; ".join(detail)
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        a, b = getattr(student, attr, None), getattr(teacher, attr, None)
        if a is not None and b is not None and a != b:
            return f"{attr} is {a} for the student and {b} for the teacher"
    return None


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) at ``temperature``, summed over classes, mean over ``mask`` positions."""
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])  # vocab padding may differ
    s = F.log_softmax(student_logits[..., :width].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[..., :width].float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1)
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


class Distillation(Technique):
    name = "distillation"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.teacher: Any = None

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        from transformers import AutoTokenizer

        from kubetune.trainer.models import load_pretrained
        from kubetune.trainer.sources import resolve_model_dir

        teacher_spec = self.config.teacher
        folder = resolve_model_dir(teacher_spec.source, ctx.base_dir, f"{WHERE}.source", teacher_spec.revision)
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=self.spec.model.trust_remote_code)
        except Exception as exc:
            raise SpecError([Problem(
                f"{WHERE}.source",
                f"no tokenizer in {folder} ({type(exc).__name__}: {exc}); the teacher must ship the tokenizer it shares with the student",
            )]) from exc
        if ctx.tokenizer is not None:
            difference = tokenizer_difference(ctx.tokenizer, teacher_tokenizer)
            if difference:
                raise SpecError([Problem(
                    f"{WHERE}.source",
                    f"the teacher's tokenizer differs from the student's ({difference}); distillation compares "
                    "logits token by token, so both models must use the same tokenizer",
                )])
        labels = ctx.labels if ctx.head in {"sequence-classification", "token-classification"} else None
        teacher = load_pretrained(
            folder, ctx.head, labels=None, dtype=teacher_spec.dtype,
            trust_remote_code=self.spec.model.trust_remote_code, where=f"{WHERE}.source",
        )
        if labels is not None and int(getattr(teacher.config, "num_labels", 0)) != len(labels):
            raise SpecError([Problem(
                f"{WHERE}.source",
                f"the teacher predicts {teacher.config.num_labels} labels and the student {len(labels)} ({labels}); "
                "a classification teacher must be trained on the same labels",
            )])
        teacher.eval()
        teacher.requires_grad_(False)
        if ctx.device is not None:
            teacher.to(ctx.device)
        self.teacher = teacher
        return model

    def compute_loss(self, ctx: TechniqueContext, model: Any, batch: dict, outputs: Any, loss: Any) -> Any:
        from kubetune.trainer.batching import model_inputs

        inputs = model_inputs(batch, ctx.device)
        if outputs is None or getattr(outputs, "logits", None) is None:
            outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        labels = inputs.get("labels")
        student_logits, mask = aligned(ctx.head, outputs.logits, labels)
        teacher_logits, _ = aligned(ctx.head, teacher_logits, labels)
        T = self.config.temperature
        kl = distillation_kl(student_logits, teacher_logits, mask, T)
        smoothing = ctx.label_smoothing  # published by regularisation (this technique provides the task loss)
        ce = hard_loss(ctx.head, outputs.logits, labels, smoothing) if smoothing and labels is not None else loss
        alpha = self.config.alpha
        ctx.loss_terms["ce"] = float(ce.detach())
        ctx.loss_terms["kl"] = float(kl.detach())
        return alpha * ce + (1.0 - alpha) * T * T * kl

    def describe(self, ctx: TechniqueContext) -> str | None:
        kl = ctx.loss_terms.get("kl")
        return f"teacher {self.config.teacher.source}, T {self.config.temperature:g}, alpha {self.config.alpha:g}" + (
            f"; last KL term {kl:.4g}" if kl is not None else "")
