"""Techniques combine: task + LoRA + curriculum + augmentation trains; refused combinations say why;
the Techniques column lists what a job uses."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from kubetune.api import validate_text
from tests.techniques.conftest import train, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
FILLER = "the a of is was it this that day night big small".split()


@pytest.mark.slow
def test_the_shipped_combination_trains_on_a_tiny_model(tiny_models, tmp_path):
    document = yaml.safe_load((ROOT / "examples" / "task-lora-curriculum-augmentation.yaml").read_text())
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        label = rng.choice(["positive", "negative"])
        words = [rng.choice(FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), rng.choice(["good", "great", "love"] if label == "positive" else ["bad", "awful", "hate"]))
        rows.append({"text": " ".join(words), "label": label})
    write_jsonl(tmp_path / "data" / "reviews.jsonl", rows)
    spec = document["spec"]
    spec["model"]["source"] = str(tiny_models["encoder"])
    spec["training"].update(epochs=6, learningRate=2e-3, microBatchSize=8)
    t = train(document, tmp_path)
    names = [technique.name for technique in t.techniques]
    assert names == ["task", "augmentation", "curriculum"]
    assert spec["peft"]["method"] == "lora" and any("lora_" in n for n, p in t.engine.module.named_parameters() if p.requires_grad)
    difficulty = t.ctx.state["curriculum"]["difficulty"]
    assert difficulty == [float(len(f["input_ids"])) for f in t.train_set.features]
    assert t.metrics["eval_accuracy"] >= 0.85, (t.initial_metrics, t.metrics)


REFUSED = [
    ({"techniques": {"curriculum": {}, "multiTask": {}}}, "spec.techniques.curriculum", "both decide the order"),
    ({"techniques": {"task": {"type": "question-answering"}, "augmentation": {"tokenMasking": {}}},
      "data": {"datasets": [{"source": "q.jsonl", "format": "question-answering"}]}}, "spec.techniques.augmentation", "answer span"),
    ({"techniques": {"augmentation": {}}}, "spec.techniques.augmentation", "at least one augmentation"),
    ({"techniques": {"task": {"type": "classification"}, "domainAdaptation": {}},
      "data": {"datasets": [{"source": "c.jsonl", "format": "classification"}]}}, "spec.techniques.domainAdaptation", "causal LM"),
    ({"techniques": {"controlledGeneration": {"dpo": {}}, "augmentation": {"randomSwap": {}}},
      "data": {"datasets": [{"source": "p.jsonl", "format": "preference"}]}}, "spec.techniques.augmentation", "fixed chosen/rejected"),
    ({"peft": {"method": "prefix"}, "techniques": {"task": {"type": "token-classification"}},
      "data": {"datasets": [{"source": "n.jsonl", "format": "token-classification"}]}}, "spec.peft.method", "shift per-token outputs"),
]


@pytest.mark.parametrize(("changes", "path", "reason"), REFUSED, ids=[r[1] + ":" + r[2] for r in REFUSED])
def test_refused_combinations_give_a_reason(changes, path, reason, capsys):
    spec = {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "t.jsonl", "format": "text"}, {"source": "u.jsonl", "format": "text", "name": "u"}]}}
    spec.update(changes)
    text = yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": spec})
    _, problems = validate_text(text, "job.yaml")
    assert any(p.path == path and reason in p.message for p in problems), problems
    # The same reason reaches a user through `kubetune validate`.
    from kubetune.cli import main

    job = Path("job-under-test.yaml")
    try:
        job.write_text(text)
        assert main(["validate", str(job)]) != 0
    finally:
        job.unlink()
    out = capsys.readouterr()
    assert path in out.out + out.err and reason in out.out + out.err


def test_the_techniques_column_lists_what_a_job_uses():
    from kubetune.api import parse_job
    from kubetune.operator.building import techniques_summary

    document = yaml.safe_load((ROOT / "examples" / "task-lora-curriculum-augmentation.yaml").read_text())
    job = parse_job(document)
    assert techniques_summary(job) == "lora,task,augmentation,curriculum"
    crd = yaml.safe_load((ROOT / "crds" / "finetunejobs.kubetune.io.yaml").read_text())
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Techniques"] == ".status.techniques"
