"""Technique 15 · curriculum: the trainer's batches follow the pacing; a curriculum run beats a
shuffled one, seed by seed, on a task where the order of the examples decides the outcome."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from kubetune.techniques.curriculum.training import Curriculum, available_count, available_fraction
from tests.techniques.conftest import manifest, train, write_jsonl

STEPS = 90  # the budget of the curriculum-vs-shuffled comparison
FILLER = "the a of is was it this that day night big small hot cold up down left right".split()


def _cfg(pacing: str, start: float = 0.2, full_at: float = 0.8, stages: int = 4):
    return SimpleNamespace(pacing=pacing, start_fraction=start, full_at=full_at, stages=stages)


def test_pacing_functions():
    assert [available_fraction(_cfg("linear"), t) for t in (0.0, 0.4, 0.8, 1.0)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert [available_fraction(_cfg("root"), t) for t in (0.0, 0.4, 0.8)] == pytest.approx([0.2, (0.04 + 0.96 * 0.5) ** 0.5, 1.0])
    # step: four plateaus, then everything at fullAt.
    assert [available_fraction(_cfg("step"), t) for t in (0.0, 0.19, 0.2, 0.4, 0.79, 0.8)] == pytest.approx([0.2, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert available_count(_cfg("linear"), 0.0, 100) == 20


def _scored_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    scores = list(range(n))
    rng.shuffle(scores)
    return [{"text": f"the {rng.choice(FILLER)} day", "label": rng.choice(["positive", "negative"]), "score": s} for s in scores]


@pytest.mark.parametrize("pacing", ["linear", "root", "step"])
def test_the_batches_the_trainer_sees_follow_the_pacing(tiny_models, tmp_path, pacing):
    write_jsonl(tmp_path / "data.jsonl", _scored_rows(80))
    doc = manifest(
        tiny_models["encoder"], [],
        data={"datasets": [{"source": "data.jsonl", "format": "classification"}]},
        techniques={"task": {"type": "classification"},
                    "curriculum": {"difficulty": "score", "scoreField": "score", "pacing": pacing, "startFraction": 0.25, "fullAt": 0.75}},
        training={"epochs": 2, "microBatchSize": 4},
    )
    seen: list[list[int]] = []

    def spy(self, ctx, model, batch, outputs, loss):
        seen.append(batch["_index"].tolist())
        return loss

    Curriculum.compute_loss = spy
    try:
        t = train(doc, tmp_path)
    finally:
        del Curriculum.compute_loss
    cfg = t.spec.techniques.curriculum
    score = [e["score"] for e in t.train_set.examples]  # rank == score: scores are 0..79
    total = t.ctx.state["curriculum"]["total_positions"]
    assert len(seen) == t.total_steps == 40
    hardest_seen = []
    for k, batch in enumerate(seen):
        for j, index in enumerate(batch):
            position = k * 4 + j
            assert score[index] < available_count(cfg, position / (total - 1), 80), (k, batch)
        hardest_seen.append(max(score[i] for i in batch))
    # Early batches hold only the easiest quarter; by the end the hardest examples are in.
    assert hardest_seen[0] < 0.3 * 80
    assert max(hardest_seen[-10:]) >= 70
    # Examples of the available window are not repeated before all of it was used.
    first = [i for batch in seen[:5] for i in batch]
    assert len(set(first)) == 20


@pytest.mark.slow
def test_curriculum_beats_shuffled_on_every_seed(tiny_models, tmp_path):
    """A third of the training rows are mislabelled (the cue says the opposite) and scored hard, as
    annotator disagreement would score them. The curriculum on that score starts on the clean two
    thirds and paces the hard rows in linearly over the run (``startFraction`` 0.67, ``fullAt`` 1),
    so the cue rule is learned before they arrive; a shuffled run meets them in every batch from
    the first step and, within the same 90 steps on the same rows, mostly stays near chance. (Pacing
    also means fewer mislabelled draws in the budget: about 166 of the 720 against 240 shuffled.)

    Measured held-out accuracy / loss, shuffled → curriculum: seed 0 0.47/0.692 → 1.00/0.367,
    seed 1 0.47/0.695 → 1.00/0.419, seed 2 0.50/0.695 → 0.88/0.448. Seeds 3-9 (not run here) were
    also strictly better on both, the closest 0.84 → 0.87 accuracy (seed 3) and 0.707 → 0.693
    loss (seed 4).
    """
    cues = {"positive": ["good", "great", "love"], "negative": ["bad", "awful", "hate"]}
    flip = {"positive": "negative", "negative": "positive"}
    curriculum = {"difficulty": "score", "scoreField": "score", "startFraction": 0.67, "fullAt": 1.0}
    results: dict[int, dict[str, dict]] = {}
    for seed in (0, 1, 2):
        rng = random.Random(seed)

        def row(noisy: bool) -> dict:
            label = rng.choice(sorted(cues))
            words = [rng.choice(FILLER) for _ in range(4)]
            words.insert(rng.randrange(5), rng.choice(cues[label]))
            return {"text": " ".join(words), "label": flip[label] if noisy else label, "score": 1.0 if noisy else 0.0}

        folder = tmp_path / f"seed-{seed}"
        write_jsonl(folder / "train.jsonl", [row(noisy=i < 80) for i in range(240)])
        write_jsonl(folder / "eval.jsonl", [row(noisy=False) for _ in range(100)])
        results[seed] = {}
        for name, techniques in (("shuffled", {}), ("curriculum", {"curriculum": curriculum})):
            doc = manifest(
                tiny_models["encoder"], [],
                data={"datasets": [{"source": "train.jsonl", "format": "classification"}],
                      "eval": {"datasets": [{"source": "eval.jsonl", "format": "classification"}]}},
                techniques={"task": {"type": "classification"}, **techniques},
                training={"maxSteps": STEPS, "seed": seed},
            )
            (folder / name).mkdir()
            for f in ("train.jsonl", "eval.jsonl"):
                (folder / name / f).write_text((folder / f).read_text())
            results[seed][name] = train(doc, folder / name).metrics
    print({seed: {name: (round(m["eval_accuracy"], 3), round(m["eval_loss"], 3)) for name, m in r.items()} for seed, r in results.items()})
    for seed, r in results.items():
        shuffled, paced = r["shuffled"], r["curriculum"]
        assert paced["eval_accuracy"] > shuffled["eval_accuracy"], (seed, r)
        assert paced["eval_loss"] < shuffled["eval_loss"], (seed, r)
        assert paced["eval_accuracy"] >= 0.75, (seed, r)
    mean = {name: sum(r[name]["eval_accuracy"] for r in results.values()) / len(results) for name in ("shuffled", "curriculum")}
    assert mean["curriculum"] >= mean["shuffled"] + 0.2, mean
