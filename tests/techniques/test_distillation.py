"""Technique 6 · knowledge distillation: the student's KL to the teacher falls, below a CE-only student's.

A causal-LM teacher is trained first (real loop, 60 steps), then two students start from the same
tiny random-init model for 20 steps on the same 160 texts: one with distillation (alpha 0.2,
T 1), one on the next tokens alone. Both are measured against the teacher on held-out text with
the plugin's own KL. Refusing another tokenizer and the loss formula are checked on one batch.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from kubetune.api import SpecError
from kubetune.trainer.techniques.base import TechniqueContext
from kubetune.techniques.distillation.training import Distillation, distillation_kl
from kubetune.trainer.losses import aligned
from tests.support.tiny_models import WORDS, word_tokenizer
from tests.techniques.conftest import manifest, parse, train, write_jsonl
from tests.techniques.reviews import CLASSIFY, review_rows


def _kl_to_teacher(trainer, teacher_dir) -> float:
    """Mean per-token KL(teacher ‖ student) on the trainer's held-out eval set, at temperature 1."""
    from kubetune.trainer.batching import model_inputs

    batch = model_inputs(trainer.collate([trainer.eval_set[i] for i in range(len(trainer.eval_set))]), "cpu")
    student = trainer.engine.module.eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    with torch.no_grad():
        student_logits, mask = aligned("causal-lm", student(**batch).logits, batch["labels"])
        teacher_logits, _ = aligned("causal-lm", teacher(**batch).logits, batch["labels"])
        return float(distillation_kl(student_logits, teacher_logits, mask, 1.0))


def _texts(folder, n, seed):
    write_jsonl(folder / "text.jsonl", [{"text": r["text"]} for r in review_rows(n, seed)])
    write_jsonl(folder / "held-out.jsonl", [{"text": r["text"]} for r in review_rows(48, seed + 1000)])
    return [{"source": "text.jsonl", "format": "text"}]


@pytest.mark.slow
def test_the_student_gets_closer_to_the_teacher_than_a_ce_only_student(tiny_models, tmp_path):
    """Causal LMs: the teacher's next-token distribution carries more than the one observed token."""
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    train(manifest(tiny_models["causal"], _texts(teacher_dir, 240, 5), training={"maxSteps": 60, "learningRate": 5e-3}), teacher_dir)
    teacher = teacher_dir / "out"

    runs = {}
    for name, techniques in (("ce", {}), ("kd", {"distillation": {"teacher": {"source": str(teacher)}, "alpha": 0.2, "temperature": 1.0}})):
        folder = tmp_path / name
        folder.mkdir()
        doc = manifest(
            tiny_models["causal"], [], data={"datasets": _texts(folder, 160, 9), "eval": {"datasets": [{"source": "held-out.jsonl", "format": "text"}]}},
            techniques=techniques,
            training={"maxSteps": 20, "learningRate": 5e-3, "logEverySteps": 1},
        )
        runs[name] = train(doc, folder)
    kd_log = [json.loads(line) for line in (tmp_path / "kd" / "out" / "trainer_log.jsonl").read_text().splitlines()]
    kl = [row["loss_terms"]["kl"] for row in kd_log]
    assert len(kl) == 20
    first, last = sum(kl[:4]) / 4, sum(kl[-4:]) / 4
    assert last < 0.5 * first, (first, last)  # the KL falls over training

    kd = _kl_to_teacher(runs["kd"], teacher)
    ce = _kl_to_teacher(runs["ce"], teacher)
    assert kd < 0.7 * ce, (kd, ce)


def _spec(tiny_models, teacher_source):
    return parse(manifest(
        tiny_models["encoder"], [{"source": "x.jsonl", "format": "classification"}],
        techniques={"task": CLASSIFY, "distillation": {"teacher": {"source": str(teacher_source)}}},
    )).spec


def test_a_teacher_with_another_tokenizer_is_refused(tiny_models, tokenizer, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["encoder"], teacher)
    other = word_tokenizer(tmp_path / "other-tokenizer", words=[w + "x" for w in WORDS])  # a tokenizer of other words
    for f in other.iterdir():
        shutil.copy(f, teacher / f.name)
    spec = _spec(tiny_models, teacher)
    ctx = TechniqueContext(spec=spec, tokenizer=tokenizer, head="sequence-classification", labels=["negative", "positive"])
    with pytest.raises(SpecError) as err:
        Distillation(spec.techniques.distillation, spec).prepare_model(ctx, None)
    [problem] = err.value.problems
    assert problem.path == "spec.techniques.distillation.teacher.source"
    assert "tokenizer differs" in problem.message and "only in the teacher's" in problem.message


def test_the_loss_is_alpha_ce_plus_t_squared_kl(tiny_models, tokenizer):
    spec = parse(manifest(
        tiny_models["encoder"], [{"source": "x.jsonl", "format": "classification"}],
        techniques={"task": CLASSIFY, "distillation": {"teacher": {"source": str(tiny_models["encoder"])}, "alpha": 0.3, "temperature": 3.0}},
    )).spec
    ctx = TechniqueContext(spec=spec, tokenizer=tokenizer, head="sequence-classification", labels=["negative", "positive"])
    plugin = Distillation(spec.techniques.distillation, spec)
    plugin.prepare_model(ctx, None)
    assert not plugin.teacher.training and not any(p.requires_grad for p in plugin.teacher.parameters())
    torch.manual_seed(3)
    student = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["encoder"]), num_labels=2)
    batch = dict(tokenizer(["good day", "bad night"], return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([1, 0])
    outputs = student(**batch)
    total = plugin.compute_loss(ctx, student, batch, outputs, outputs.loss)
    with torch.no_grad():
        teacher_logits = plugin.teacher(**batch).logits
    s, t = torch.log_softmax(outputs.logits / 3.0, -1), torch.log_softmax(teacher_logits / 3.0, -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    assert ctx.loss_terms["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert float(total) == pytest.approx(float(0.3 * outputs.loss + 0.7 * 9.0 * kl), rel=1e-5)
