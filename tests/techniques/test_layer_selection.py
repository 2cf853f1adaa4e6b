"""Technique 10 · layer-specific: exactly the selected parameters change; bad selections name what exists.

Training runs through the real loop (DeepSpeed on CPU); "changed" compares the exported weights
with the pretrained ones bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kubetune.api import SpecError
from tests.techniques.conftest import manifest, train, write_jsonl
from tests.techniques.reviews import FILLER, POSITIVE


def _text(tmp_path) -> list[dict]:
    rows = [{"text": " ".join(FILLER[(i + j) % len(FILLER)] for j in range(8)) + " " + POSITIVE[i % 6]} for i in range(64)]
    write_jsonl(tmp_path / "text.jsonl", rows)
    return [{"source": "text.jsonl", "format": "text"}]


def _run(tiny_models, tmp_path, selection, **spec):
    doc = manifest(
        tiny_models["causal"], _text(tmp_path),
        techniques={"layerSelection": selection},
        training={"maxSteps": 3, "learningRate": 1e-2},
        **spec,
    )
    return train(doc, tmp_path)


def _changed(tiny_models, tmp_path) -> set[str]:
    before = AutoModelForCausalLM.from_pretrained(str(tiny_models["causal"])).state_dict()
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_last_block_and_head_train_everything_else_stays_bit_identical(tiny_models, tmp_path):
    _run(tiny_models, tmp_path, {"layers": ["-1:"]})
    changed = _changed(tiny_models, tmp_path)
    expected = {k for k in load_file(str(tmp_path / "out" / "model.safetensors")) if k.startswith("model.layers.1.")} | {"lm_head.weight"}
    assert changed == expected


def test_a_pattern_selects_the_mlps_of_every_block_without_the_head(tiny_models, tmp_path):
    _run(tiny_models, tmp_path, {"patterns": ["*.mlp.*"], "trainHead": False})
    changed = _changed(tiny_models, tmp_path)
    assert changed == {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")}


def test_lora_restricted_to_a_chosen_block(tiny_models, tmp_path):
    t = _run(tiny_models, tmp_path, {"layers": ["1"], "trainHead": False}, peft={"method": "lora", "r": 4})
    model = t.engine.module
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora, "peft attached no adapters"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in lora if ".layers.1." in n}
    # Block 0's adapters are still at their identity initialisation (B = 0): LoRA acts on block 1 only.
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in lora.items() if ".layers.0." in n and "lora_B" in n)
    assert any(float(p.detach().abs().max()) > 0.0 for n, p in lora.items() if ".layers.1." in n and "lora_B" in n)


def test_per_group_learning_rates_reach_the_optimizer(tiny_models, tmp_path):
    t = _run(tiny_models, tmp_path, {"learningRates": [{"pattern": "*.mlp.*", "learningRate": 3e-2}, {"pattern": "lm_head*", "learningRate": 1e-4}]})
    by_lr: dict[float, set[str]] = {}
    names = {id(p): n for n, p in t.engine.module.named_parameters()}
    for group in t.engine.optimizer.param_groups:
        by_lr.setdefault(round(group["lr"], 8), set()).update(names[id(p)] for p in group["params"])
    assert by_lr[0.03] == {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")}
    assert by_lr[0.0001] == {"lm_head.weight"}
    assert "model.embed_tokens.weight" in by_lr[0.01]  # everything else keeps training.learningRate


def test_a_pattern_that_matches_nothing_is_an_error_listing_what_exists(tiny_models, tmp_path):
    with pytest.raises(SpecError) as err:
        _run(tiny_models, tmp_path, {"patterns": ["*.mlp.*", "*.feed_forward.*"]})
    [problem] = err.value.problems
    assert problem.path == "spec.techniques.layerSelection.patterns[1]"
    assert "'*.feed_forward.*' matches no parameter" in problem.message
    assert "model.layers.*.mlp.up_proj.weight" in problem.message and "lm_head.weight" in problem.message


def test_a_block_index_outside_the_model_is_an_error_giving_the_depth(tiny_models, tmp_path):
    with pytest.raises(SpecError) as err:
        _run(tiny_models, tmp_path, {"layers": ["0", "5", "4:8"]})
    assert [p.path for p in err.value.problems] == ["spec.techniques.layerSelection.layers[1]", "spec.techniques.layerSelection.layers[2]"]
    assert "the model has 2 blocks" in err.value.problems[0].message
