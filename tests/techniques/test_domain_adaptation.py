"""Technique 1 · domain adaptation: packed continued pre-training drops held-out domain perplexity."""

from __future__ import annotations

import random

import pytest

from tests.techniques.conftest import manifest, train, write_jsonl


def _documents(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    who, verb, what = ["the court", "the law", "the team"], ["said", "likes", "says"], ["the vote", "the game", "the song"]
    docs = []
    for _ in range(n):
        sentences = [f"{rng.choice(who)} {rng.choice(verb)} {rng.choice(what)} ." for _ in range(rng.randint(1, 4))]
        docs.append({"text": " ".join(sentences)})
    return docs


@pytest.mark.slow
def test_held_out_domain_perplexity_drops_well_below_the_start(tiny_models, tokenizer, tmp_path):
    write_jsonl(tmp_path / "domain.jsonl", _documents(200, 0))
    write_jsonl(tmp_path / "general.jsonl", [{"body": "the cat and the dog are big"}, {"body": "one two three four"}])
    doc = manifest(
        tiny_models["causal"], [],
        data={"datasets": [{"name": "legal", "source": "domain.jsonl", "format": "text"}], "eval": {"holdoutFraction": 0.2}},
        techniques={"domainAdaptation": {"blockSize": 32, "generalData": {"source": "general.jsonl", "field": "body", "ratio": 0.2}}},
        training={"epochs": 6, "microBatchSize": 8},
    )
    t = train(doc, tmp_path)
    state = t.ctx.state["domainAdaptation"]
    # 160 domain documents + a fifth of general text: 40 general documents (ratio 0.2 of the mix).
    assert state["general_documents"] == 40 and state["documents"] == 200
    # Documents are packed into full blocks: every block but the last is exactly 30 tokens of text
    # plus the BOS/EOS the encoder adds, and no document is lost.
    lengths = [len(f["input_ids"]) for f in t.train_set.features]
    assert all(n == 32 for n in lengths[:-1]) and len(lengths) == state["blocks"]
    packed_text = " ".join(e["text"] for e in t.train_set.examples)
    assert packed_text.count("[EOS]") >= 200 - 1
    # Held-out documents stay whole, and their perplexity falls far below the random start.
    assert len(t.eval_set) == 40
    start, end = t.initial_metrics["eval_perplexity"], t.metrics["eval_perplexity"]
    assert end < start / 20, (start, end)
    assert end < 10


def test_without_packing_documents_stay_whole(tiny_models, tmp_path):
    write_jsonl(tmp_path / "domain.jsonl", _documents(20, 1))
    doc = manifest(
        tiny_models["causal"], [],
        data={"datasets": [{"source": "domain.jsonl", "format": "text"}]},
        techniques={"domainAdaptation": {"packing": False}},
        training={"maxSteps": 1},
    )
    t = train(doc, tmp_path)
    assert [e["text"] for e in t.train_set.examples] == [d["text"] for d in _documents(20, 1)]
