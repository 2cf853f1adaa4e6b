"""Techniques II combined as users combine them, through the real loop (DeepSpeed on CPU).

* classification + LoRA + layer selection + early stopping: trains, only the selected block's
  adapters (and the head) learn, and the run stops on its metric;
* transfer learning (linear probe) + regularisation: the base stays bit-identical while weight
  decay, L2-SP and L1 act on the head alone.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModel

from tests.techniques.conftest import manifest, train
from tests.techniques.reviews import CLASSIFY, review_files


def test_classification_lora_layer_selection_and_early_stopping_train_together(tiny_models, tmp_path):
    data = review_files(tmp_path, n_train=160)
    data["eval"]["everySteps"] = 4
    doc = manifest(
        tiny_models["encoder"], [], data=data,
        peft={"method": "lora", "r": 8},
        techniques={
            "task": CLASSIFY,
            "layerSelection": {"layers": ["1"]},
            "earlyStopping": {"patience": 2, "minDelta": 0.5},  # no later evaluation can beat the first by 0.5
        },
        training={"maxSteps": 40, "learningRate": 5e-3},
    )
    t = train(doc, tmp_path)
    model = t.engine.module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.1." in n and "lora_" in n or "classifier" in n for n in trainable)
    assert any("lora_" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert t.step == 12  # best at step 4, then two evaluations (8, 12) without improving by 0.5
    reason = json.loads((tmp_path / "status.json").read_text())["progress"]["stopReason"]
    assert reason.startswith("early-stopped:")
    # It trained: block 1's LoRA B matrices start at zero and have moved.
    assert all(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if ".layer.1." in n and "lora_B" in n)


def test_linear_probe_with_regularisation_keeps_the_base_and_regularises_the_head(tiny_models, tmp_path):
    doc = manifest(
        tiny_models["encoder"], [], data=review_files(tmp_path),
        techniques={
            "task": CLASSIFY,
            "transferLearning": {"strategy": "linear-probe"},
            "regularization": {"weightDecay": 0.1, "l2Sp": 0.1, "l1": 1e-4, "labelSmoothing": 0.1},
        },
        training={"maxSteps": 6, "learningRate": 5e-3, "logEverySteps": 1},
    )
    t = train(doc, tmp_path)
    before = {f"bert.{k}": v for k, v in AutoModel.from_pretrained(str(tiny_models["encoder"])).state_dict().items()}
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    names = {id(p): n for n, p in t.engine.module.named_parameters()}
    groups = {(g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"]))) for g in t.engine.optimizer.param_groups}
    assert groups == {(0.1, ("classifier.weight",)), (0.0, ("classifier.bias",))}
    terms = [json.loads(line)["loss_terms"] for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    # L2-SP has no pretrained head weights to pull towards: with the base frozen it adds nothing.
    assert all("l2_sp" not in row and row["l1"] > 0 and row["label_smoothing"] != 0 for row in terms)
