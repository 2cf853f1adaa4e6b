"""Technique 14 · continual learning: start from an earlier job, and forget less of its task.

Task A is the sentiment reviews of ``reviews.py`` (a cue word decides the label). Task B conflicts
with it: a topic word decides the label (sports → positive, music → negative), and every B review
also carries a sentiment cue word of the *opposite* sentiment. B can be fitted two ways: by the
topic, which leaves A intact, or by the shortcut "flip the sentiment cues", which destroys A. Plain
training from A's weights takes the shortcut (A's accuracy falls to ~0); replay of A's data and EWC
(Fisher of A's data) make the model use the topic instead, so A is kept and B is still learned.

All runs go through the real loop (DeepSpeed on CPU, one process) with the tiny BERT of the
technique fixtures; every B job evaluates on A's and B's eval sets, so per-task metrics
``a/eval_accuracy`` and ``b/eval_accuracy`` show both before (step 0) and after training.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from kubetune.api import SpecError
from tests.techniques.conftest import manifest, parse, train, write_jsonl
from tests.techniques.reviews import CLASSIFY, FILLER, LABELS, NEGATIVE, POSITIVE, review_rows

SPORTS = "game team win lose play".split()
MUSIC = "song sing tune beat music".split()
WHERE = "spec.techniques.continualLearning.fromCheckpoint"


def topic_rows(n: int, seed: int) -> list[dict]:
    """Task B (see the module doc): the topic decides, the sentiment cue says the opposite."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        topic = rng.choice(SPORTS if label == "positive" else MUSIC)
        cue = rng.choice(NEGATIVE if label == "positive" else POSITIVE)
        words = [rng.choice(FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), topic)
        words.insert(rng.randrange(7), cue)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _eval(*names: str, data: Path) -> dict:
    return {"datasets": [{"name": n, "source": str(data / n / "eval.jsonl"), "format": "classification"} for n in names]}


@pytest.fixture(scope="module")
def task_a(tiny_models, tmp_path_factory):
    """Task A trained to ~0.98 accuracy; its run folder.

    60 steps, not more: at a saturated loss the per-example gradients, and with them the empirical
    Fisher that EWC weighs by, all but vanish (see the plugin's module doc).
    """
    data = tmp_path_factory.mktemp("cl-data")
    write_jsonl(data / "a" / "train.jsonl", review_rows(160, 0))
    write_jsonl(data / "a" / "eval.jsonl", review_rows(64, 1000))
    write_jsonl(data / "b" / "train.jsonl", topic_rows(160, 1))
    write_jsonl(data / "b" / "eval.jsonl", topic_rows(64, 2000))
    run = data / "a-run"
    run.mkdir()
    doc = manifest(
        tiny_models["encoder"], [{"name": "a", "source": str(data / "a" / "train.jsonl"), "format": "classification"}],
        techniques={"task": CLASSIFY}, training={"maxSteps": 60, "learningRate": 1e-3},
    )
    doc["spec"]["data"]["eval"] = _eval("a", data=data)
    t = train(doc, run)
    assert t.metrics["eval_accuracy"] >= 0.95, t.metrics
    return {"data": data, "run": run, "metrics": t.metrics}


def _continue(tiny_models, task_a, tmp_path, continual, *, steps=150, peft=None, name="b"):
    data = task_a["data"]
    run = tmp_path / name
    run.mkdir()
    doc = manifest(
        tiny_models["encoder"], [{"name": "b", "source": str(data / "b" / "train.jsonl"), "format": "classification"}],
        techniques={"task": CLASSIFY, **({"continualLearning": continual} if continual else {})},
        training={"maxSteps": steps, "learningRate": 1e-3},
        **({"peft": peft} if peft else {}),
    )
    doc["spec"]["data"]["eval"] = _eval("a", "b", data=data)
    return train(doc, run)


@pytest.mark.slow
def test_replay_and_ewc_keep_the_earlier_task_while_the_new_one_is_learned(tiny_models, task_a, tmp_path):
    start = str(task_a["run"] / "out")
    replay_source = str(task_a["data"] / "a" / "train.jsonl")
    plain = _continue(tiny_models, task_a, tmp_path, {"fromCheckpoint": start}, name="plain")
    replay = _continue(tiny_models, task_a, tmp_path, {"fromCheckpoint": start, "replay": {"source": replay_source, "ratio": 0.5}}, name="replay")
    # EWC alone: replay with ratio 0 mixes nothing in but gives EWC A's data for the Fisher.
    ewc = _continue(tiny_models, task_a, tmp_path, {
        "fromCheckpoint": start, "replay": {"source": replay_source, "ratio": 0.0}, "ewc": {"lambda": 3e6, "fisherSamples": 64},
    }, name="ewc")
    after = {n: (t.metrics["a/eval_accuracy"], t.metrics["b/eval_accuracy"]) for n, t in [("plain", plain), ("replay", replay), ("ewc", ewc)]}

    for t in (plain, replay, ewc):  # every run starts where A ended: A solved, B not
        assert t.initial_metrics["a/eval_accuracy"] >= 0.95 and t.initial_metrics["b/eval_accuracy"] <= 0.1, t.initial_metrics
    assert after["plain"][0] <= 0.1, after  # plain training forgets A (it learns the flipped cues)
    assert after["replay"][0] >= 0.9 and after["ewc"][0] >= 0.8, after
    assert all(b >= 0.9 for _, b in after.values()), after  # B is learned every way
    assert replay.ctx.state["continualLearning"]["replayExamples"] == 160  # ratio 0.5 of 160 new examples
    assert ewc.ctx.state["continualLearning"]["fisherData"] == "replay"
    assert ewc.ctx.state["continualLearning"]["fisherExamples"] == 64
    assert ewc.ctx.state["continualLearning"]["replayExamples"] == 0


def test_from_checkpoint_starts_from_the_earlier_weights_output_or_checkpoint(tiny_models, task_a, tmp_path):
    final = task_a["metrics"]
    # A relative path resolves against the manifest's folder (here the run folder of the B job).
    (tmp_path / "jobs").mkdir()
    shutil.copytree(task_a["run"] / "out", tmp_path / "jobs" / "earlier-output")
    for where, kind in [("../earlier-output", "full"), (str(task_a["run"] / "ckpt"), "checkpoint")]:
        t = _continue(tiny_models, task_a, tmp_path / "jobs", {"fromCheckpoint": where}, steps=1, name=kind)
        assert t.ctx.state["continualLearning"]["kind"] == kind
        assert t.initial_metrics["a/eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5, abs=1e-6)
        assert t.initial_metrics["a/eval_accuracy"] == final["eval_accuracy"]
    fresh = _continue(tiny_models, task_a, tmp_path, {"replay": {"source": str(task_a["data"] / "a" / "train.jsonl")}}, steps=1, name="fresh")
    assert fresh.initial_metrics["a/eval_accuracy"] < 0.8  # without fromCheckpoint: model.source's random head


def test_a_lora_adapter_continues_as_lora_or_merged_into_full_fine_tuning(tiny_models, task_a, tmp_path):
    lora = {"method": "lora", "r": 4, "alpha": 8}
    earlier = _continue(tiny_models, task_a, tmp_path, None, steps=20, peft=lora, name="lora-a")  # an adapter on model.source
    adapter = str(tmp_path / "lora-a" / "out")
    assert (Path(adapter) / "adapter_config.json").exists()
    for peft, name in [(lora, "lora-b"), (None, "full-b")]:
        t = _continue(tiny_models, task_a, tmp_path, {"fromCheckpoint": adapter}, steps=1, peft=peft, name=name)
        assert t.ctx.state["continualLearning"]["kind"] == "adapter"
        for key in ("a/eval_loss", "b/eval_loss"):
            assert t.initial_metrics[key] == pytest.approx(earlier.metrics[key], rel=1e-4), (name, key)


def test_the_ewc_term_is_half_lambda_times_fisher_weighted_squared_distance(tiny_models, task_a, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune.trainer.running import RunOptions, RunPaths
    from kubetune.trainer.training import Trainer

    rows = review_rows(12, 7)
    write_jsonl(tmp_path / "old.jsonl", rows)
    lam = 3.0
    doc = manifest(
        tiny_models["encoder"], [{"source": str(task_a["data"] / "b" / "train.jsonl"), "format": "classification"}],
        techniques={"task": CLASSIFY, "continualLearning": {
            "fromCheckpoint": str(task_a["run"] / "out"), "replay": {"source": "old.jsonl", "ratio": 0.0},
            "ewc": {"lambda": lam, "fisherSamples": 64},  # more than the 12 rows: all of them are used
        }},
    )
    trainer = Trainer(parse(doc), RunPaths(tmp_path, tmp_path / "out", tmp_path / "ckpt", tmp_path), RunOptions(local=True, progress=False))
    try:
        trainer.setup()
        module, ctx = trainer.engine.module, trainer.ctx
        plugin = next(p for p in trainer.techniques if p.name == "continualLearning")
        # The Fisher, independently: the earlier output loaded with transformers, per-example grads squared.
        reference = AutoModelForSequenceClassification.from_pretrained(str(task_a["run"] / "out")).eval()
        tok = AutoTokenizer.from_pretrained(str(task_a["run"] / "out"))
        params = dict(reference.named_parameters())
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        for row in rows:
            enc = tok(row["text"], return_tensors="pt")
            loss = reference(**enc, labels=torch.tensor([LABELS.index(row["label"])])).loss
            for (n, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    fisher[n] += g.pow(2) / len(rows)
        start = {n: p.detach().clone() for n, p in params.items()}
        torch.manual_seed(1)
        with torch.no_grad():  # move the weights away from the start
            for p in module.parameters():
                p.add_(0.01 * torch.randn_like(p))
        total = plugin.compute_loss(ctx, module, {}, None, torch.tensor(0.0))
        expected = 0.5 * lam * sum((fisher[n] * (p.detach() - start[n]).pow(2)).sum() for n, p in module.named_parameters())
        assert ctx.loss_terms["ewc"] == pytest.approx(float(expected), rel=1e-3)
        assert float(total.detach()) == pytest.approx(float(expected), rel=1e-3)
        assert float(expected) > 0
        total.backward()  # differentiable: it pulls the weights back
        assert module.classifier.weight.grad is not None and float(module.classifier.weight.grad.abs().sum()) > 0
    finally:
        trainer.cleanup()


def test_a_from_checkpoint_that_is_not_there_or_not_a_model_is_refused_with_the_field_path(tiny_models, task_a, tmp_path):
    (tmp_path / "jobs" / "notes").mkdir(parents=True)
    (tmp_path / "jobs" / "notes" / "readme.txt").write_text("not a model")
    for i, (where, says) in enumerate([("../no/such/run", "does not exist"), ("../notes", "neither a model output")]):
        with pytest.raises(SpecError) as err:
            _continue(tiny_models, task_a, tmp_path / "jobs", {"fromCheckpoint": where}, steps=1, name=f"job-{i}")
        problem = err.value.problems[0]
        assert problem.path == WHERE and says in problem.message, problem


def test_replay_mix_follows_the_ratio_is_seeded_and_keeps_its_own_format(tiny_models, tmp_path):
    from kubetune.trainer.encoding import Encoder
    from kubetune.techniques.continual_learning.training import replay_examples, replay_mix

    write_jsonl(tmp_path / "old.jsonl", [{"text": f"the cat {w}"} for w in "one two three four five".split()])
    spec = parse(manifest(
        tiny_models["causal"], [{"source": "new.jsonl", "format": "instruction"}],
        techniques={"continualLearning": {"replay": {"source": "old.jsonl", "format": "text", "ratio": 0.2}}},
    )).spec
    old = replay_examples(spec, tmp_path)
    assert [e["_format"] for e in old] == ["text"] * 5 and {e["_task"] for e in old} == {"replay"}
    features = Encoder(spec, __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_models["causal"])))(old[0])
    assert features["labels"] == features["input_ids"]  # a text example: every token is a target
    mix = replay_mix(old, 80, 0.2, seed=0)
    assert len(mix) == 20  # 20 of 100 examples
    counts = [sum(m is e for m in mix) for e in old]
    assert counts == [4] * 5  # whole passes over a small replay set
    assert [id(m) for m in mix] == [id(m) for m in replay_mix(old, 80, 0.2, seed=0)]
    assert [id(m) for m in mix] != [id(m) for m in replay_mix(old, 80, 0.2, seed=1)]
    assert replay_mix(old, 80, 0.0, seed=0) == []
