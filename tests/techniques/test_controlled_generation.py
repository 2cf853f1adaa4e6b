"""Technique 9 · controlled generation: control codes steer generation; DPO raises the preference margin."""

from __future__ import annotations

import random

import pytest
import torch

from kubetune.techniques.controlled_generation.training import control_prompt
from tests.techniques.conftest import manifest, train, write_jsonl

FRUITS = "apple banana cherry grape lemon".split()
ANIMALS = "cat dog bird fish horse".split()


@pytest.mark.slow
def test_a_control_code_makes_generations_carry_the_attribute(tiny_models, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(300):
        attribute = rng.choice(["fruit", "animal"])
        words = FRUITS if attribute == "fruit" else ANIMALS
        row = {"text": "the day is " + " ".join(rng.choice(words) for _ in range(3)), "attribute": attribute}
        if i % 3 == 0:
            del row["attribute"]  # a third trains unconditioned
        rows.append(row)
    write_jsonl(tmp_path / "data.jsonl", rows)
    doc = manifest(
        tiny_models["causal"], [],
        data={"datasets": [{"source": "data.jsonl", "format": "text"}]},
        techniques={"controlledGeneration": {"controlCodes": {"field": "attribute", "values": ["fruit", "animal"]}}},
        training={"epochs": 8},
    )
    t = train(doc, tmp_path)
    tok, model = t.tokenizer, t.engine.module.eval()
    cfg = t.spec.techniques.controlled_generation.control_codes
    # The codes are single special tokens, at the front of what the model read.
    assert len(tok("<fruit>", add_special_tokens=False)["input_ids"]) == 1
    coded = next(e for e in t.train_set.examples if e.get("attribute") == "fruit")
    assert coded["text"].startswith("<fruit> the day is")

    def rate(prompt: str, vocabulary: list[str]) -> float:
        ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=True,
                                 num_return_sequences=40, pad_token_id=tok.pad_token_id)
        words = [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).split() for row in out]
        hits = [sum(w in vocabulary for w in ws) for ws in words]
        return sum(hits) / max(1, sum(len(ws) for ws in words))

    rates = {}
    for value, vocabulary in (("fruit", FRUITS), ("animal", ANIMALS)):
        rates[value] = (rate(control_prompt(cfg, value, "the day is"), vocabulary), rate("the day is", vocabulary))
    print(rates)  # attribute → (share of its words with its code, without a code)
    for with_code, without in rates.values():
        assert with_code >= 0.9
    # Averaged over the attributes, a code raises the share of the asked-for attribute's words by
    # far: without one the model picks either (about half each).
    gain = sum(w - wo for w, wo in rates.values()) / len(rates)
    assert gain >= 0.3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_raises_the_chosen_over_rejected_margin(tiny_models, tmp_path, method):
    rng = random.Random(1)
    colors = "red blue green yellow black".split()
    good = dict(zip(colors, ANIMALS))
    rows = []
    for _ in range(120):
        c = rng.choice(colors)
        bad = rng.choice([a for a in ANIMALS if a != good[c]])
        rows.append({"prompt": f"what animal is {c} ?", "chosen": good[c], "rejected": bad})
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    doc = manifest(
        tiny_models["causal"], [],
        data={"datasets": [{"source": "prefs.jsonl", "format": "preference"}], "eval": {"holdoutFraction": 0.2}},
        peft={"method": method, "r": 8} if method == "lora" else {"method": "full"},
        techniques={"controlledGeneration": {"dpo": {"beta": 0.5}}},
        training={"epochs": 4 if method == "full" else 8, "learningRate": 1e-3 if method == "full" else 5e-3},
    )
    t = train(doc, tmp_path)
    before, after = t.initial_metrics, t.metrics
    print({"before": before, "after": after})
    # The reference is the initial model: before training the policy equals it (h = 0).
    assert before["eval_dpo_margin"] == pytest.approx(0.0, abs=1e-4)
    assert after["eval_logp_margin"] > before["eval_logp_margin"] + 1.5
    assert after["eval_dpo_accuracy"] >= 0.9


def test_each_dpo_loss_type_is_its_published_objective():
    """techniques.controlledGeneration.dpo.lossType: sigmoid (DPO, with conservative label smoothing),
    ipo (squared distance of the margin from 1/(2 beta)) and hinge (SLiC); beta scales the margin."""
    from kubetune.techniques.controlled_generation.training import dpo_loss

    h = torch.tensor([-2.0, 0.0, 0.5, 5.0])  # chosen-minus-rejected log-ratio margins
    beta = 0.5
    sigmoid = dpo_loss(h, beta, "sigmoid", 0.0)
    assert torch.allclose(sigmoid, -torch.nn.functional.logsigmoid(beta * h))
    smoothed = dpo_loss(h, beta, "sigmoid", 0.1)
    assert torch.allclose(smoothed, 0.9 * sigmoid + 0.1 * -torch.nn.functional.logsigmoid(-beta * h))
    assert torch.allclose(dpo_loss(h, beta, "ipo", 0.0), (h - 1.0) ** 2)  # 1 / (2 * 0.5) = 1
    assert torch.allclose(dpo_loss(h, beta, "hinge", 0.0), torch.tensor([2.0, 1.0, 0.75, 0.0]))
    # the preferred answer gaining lowers sigmoid and hinge; IPO stops at its target margin
    assert sigmoid[3] < sigmoid[2] < sigmoid[1] < sigmoid[0]
    assert dpo_loss(torch.tensor([1.0]), beta, "ipo", 0.0).item() == 0.0
