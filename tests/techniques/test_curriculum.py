"""Technique 15 · curriculum: the trainer's batches follow the pacing; a curriculum run ends at least
as good as a shuffled one on a task built to reward it."""

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
def test_curriculum_ends_at_least_as_good_as_shuffled(tiny_models, tmp_path):
    # A third of the training rows are mislabelled (the cue says the opposite) and scored hard. A
    # curriculum on that score brings them in only gradually, so the run sees far fewer of them
    # than a shuffled run, which meets them in every third batch from the start.
    rng = random.Random(1)
    cues = {"positive": ["good", "great", "love"], "negative": ["bad", "awful", "hate"]}
    flip = {"positive": "negative", "negative": "positive"}

    def row(noisy: bool) -> dict:
        label = rng.choice(sorted(cues))
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randrange(5), rng.choice(cues[label]))
        return {"text": " ".join(words), "label": flip[label] if noisy else label, "score": 1.0 if noisy else 0.0}

    write_jsonl(tmp_path / "train.jsonl", [row(noisy=i % 3 == 2) for i in range(240)])
    write_jsonl(tmp_path / "eval.jsonl", [row(noisy=False) for _ in range(80)])
    curriculum = {"difficulty": "score", "scoreField": "score", "startFraction": 0.67, "fullAt": 1.0}
    results = {}
    for name, techniques in (("shuffled", {}), ("curriculum", {"curriculum": curriculum})):
        doc = manifest(
            tiny_models["encoder"], [],
            data={"datasets": [{"source": "train.jsonl", "format": "classification"}],
                  "eval": {"datasets": [{"source": "eval.jsonl", "format": "classification"}]}},
            techniques={"task": {"type": "classification"}, **techniques},
            training={"maxSteps": STEPS},
        )
        (tmp_path / name).mkdir()
        for f in ("train.jsonl", "eval.jsonl"):
            (tmp_path / name / f).write_text((tmp_path / f).read_text())
        results[name] = train(doc, tmp_path / name).metrics
    print(results)
    assert results["curriculum"]["eval_accuracy"] >= results["shuffled"]["eval_accuracy"]
    assert results["curriculum"]["eval_accuracy"] >= 0.75
