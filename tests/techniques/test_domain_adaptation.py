"""Technique 1 · domain adaptation: packed continued pre-training drops held-out domain perplexity,
beats the same run without the domain corpus, and the general-text mix limits forgetting."""

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


_GENERAL_SENTENCE = ("the {} likes the {} at {} .", (["cat", "dog", "bird", "horse", "cow"], ["apple", "banana", "cherry", "grape", "lemon"], ["day", "night"]))
_DOMAIN_SENTENCE = ("the {} {} the {} {} .", (["court", "law", "team"], ["said", "says"], ["vote", "game", "song"], ["win", "lose", "play"]))


def _corpus(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` documents of 2-4 template sentences: general (animals and fruit) or domain (courts and votes)."""
    rng = random.Random(seed)
    template, slots = _GENERAL_SENTENCE if kind == "general" else _DOMAIN_SENTENCE
    return [
        {"text": " ".join(template.format(*(rng.choice(s) for s in slots)) for _ in range(rng.randint(2, 4)))}
        for _ in range(n)
    ]


@pytest.mark.slow
def test_the_domain_corpus_beats_the_same_run_without_it_and_the_general_mix_limits_forgetting(tiny_models, tmp_path):
    """A start model that knows general text (60 steps on it) is trained on for 40 more steps three ways:
    general text only (the same run without the domain corpus), the domain corpus only, and the domain
    corpus with ``generalData`` mixed in at half the documents. Held-out documents of both kinds are
    evaluated as two named eval sets (``domain/eval_loss``, ``general/eval_loss``).

    Measured (training seed 0; seeds 1 and 2 came within 0.1 of these): held-out domain loss 5.21 at
    the start, 6.11 after general-only, 1.59 after domain-only, 1.84 with the mix; held-out general
    loss 1.37 at the start, 0.79 after general-only, 2.41 after domain-only (forgetting), 0.88 with
    the mix.
    """
    for name, rows in (("general.jsonl", _corpus("general", 300, 1)), ("general2.jsonl", _corpus("general", 200, 2)),
                       ("domain.jsonl", _corpus("domain", 200, 3)), ("domain-eval.jsonl", _corpus("domain", 40, 4)),
                       ("general-eval.jsonl", _corpus("general", 40, 5))):
        write_jsonl(tmp_path / name, rows)
    held_out = {"datasets": [{"name": "domain", "source": "domain-eval.jsonl", "format": "text"},
                             {"name": "general", "source": "general-eval.jsonl", "format": "text"}]}

    def run(name: str, model, corpus: str, steps: int, general_ratio: float | None = None) -> dict:
        technique: dict = {"blockSize": 32}
        if general_ratio is not None:
            technique["generalData"] = {"source": "general2.jsonl", "ratio": general_ratio}
        doc = manifest(
            model, [], data={"datasets": [{"name": "train", "source": corpus, "format": "text"}], "eval": held_out},
            techniques={"domainAdaptation": technique}, training={"maxSteps": steps, "microBatchSize": 8},
        )
        workdir = tmp_path / name
        workdir.mkdir()
        for f in tmp_path.glob("*.jsonl"):
            (workdir / f.name).write_text(f.read_text())
        t = train(doc, workdir)
        return {"start": t.initial_metrics, "end": t.metrics, "output": workdir / "out"}

    base = run("base", tiny_models["causal"], "general.jsonl", 60)
    start = base["end"]
    general_only = run("general-only", base["output"], "general2.jsonl", 40)["end"]
    domain_only = run("domain-only", base["output"], "domain.jsonl", 40)
    mixed = run("mixed", base["output"], "domain.jsonl", 40, general_ratio=0.5)["end"]
    assert domain_only["start"]["domain/eval_loss"] == pytest.approx(start["domain/eval_loss"], rel=1e-4)  # all three start there
    domain_only = domain_only["end"]
    print({"start": start, "general-only": general_only, "domain-only": domain_only, "mixed": mixed})
    # The domain corpus is what teaches the domain: both runs that read it end far below the run
    # that did not (a loss 3 nats lower is a perplexity 20 times lower).
    assert domain_only["domain/eval_loss"] < general_only["domain/eval_loss"] - 3.0
    assert mixed["domain/eval_loss"] < general_only["domain/eval_loss"] - 3.0
    # Domain-only training forgets general text; the mix keeps it (below even the start model).
    assert domain_only["general/eval_loss"] > start["general/eval_loss"] + 0.5
    assert mixed["general/eval_loss"] < domain_only["general/eval_loss"] / 2
    assert mixed["general/eval_loss"] < start["general/eval_loss"]
