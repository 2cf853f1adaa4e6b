"""Technique 3 · transfer learning: a frozen base stays bit-identical; unfreezing follows its schedule.

The base is the tiny BERT encoder of the fixtures (saved without a head, so the classification
head is new); training runs through the real loop (DeepSpeed on CPU) unless a test needs to look
at gradients between steps, where it drives the plugin's hooks itself.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from kubetune.api import SpecError
from kubetune.trainer.techniques.base import TechniqueContext
from kubetune.techniques.transfer_learning.training import TransferLearning
from tests.techniques.conftest import manifest, parse, train
from tests.techniques.reviews import CLASSIFY, review_files


def _pretrained(folder) -> dict[str, torch.Tensor]:
    return {f"bert.{k}": v.clone() for k, v in AutoModel.from_pretrained(str(folder)).state_dict().items()}


def _job(tiny_models, tmp_path, transfer, **training):
    data = review_files(tmp_path)
    return manifest(
        tiny_models["encoder"], [], data=data,
        techniques={"task": CLASSIFY, "transferLearning": transfer},
        training={"maxSteps": 6, "learningRate": 5e-3, **training},
    )


def test_linear_probe_keeps_the_base_bit_identical_and_moves_only_the_head(tiny_models, tmp_path):
    before = _pretrained(tiny_models["encoder"])
    t = train(_job(tiny_models, tmp_path, {"strategy": "linear-probe"}), tmp_path)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = [k for k in after if k.startswith("bert.")]
    head = [k for k in after if k.startswith("classifier.")]
    assert len(base) == len(before) and sorted(head) == ["classifier.bias", "classifier.weight"]
    changed_base = [k for k in base if not torch.equal(before[k], after[k])]
    assert changed_base == []
    # The head learned: it moved away from the fresh head the plugin initialised from the seed.
    fresh = BertForSequenceClassification.from_pretrained(str(tiny_models["encoder"]), num_labels=2)
    TransferLearning(t.spec.techniques.transfer_learning, t.spec).prepare_model(TechniqueContext(spec=t.spec), fresh)
    assert (after["classifier.weight"] - fresh.classifier.weight.detach()).abs().max() > 1e-3
    model = t.engine.module
    assert all(p.requires_grad == n.startswith("classifier.") for n, p in model.named_parameters())
    assert t.metrics["eval_accuracy"] > t.initial_metrics["eval_accuracy"]


def test_full_strategy_with_head_and_base_learning_rates(tiny_models, tmp_path):
    doc = _job(tiny_models, tmp_path, {"strategy": "full", "headLearningRate": 1e-2, "baseLearningRate": 1e-4}, maxSteps=2)
    t = train(doc, tmp_path)
    groups = t.engine.optimizer.param_groups
    lrs = {g["name"].split("/")[-1]: g["lr"] for g in groups if "name" in g}
    assert lrs == {"head": pytest.approx(1e-2), "base": pytest.approx(1e-4)}
    sizes = {g["name"].split("/")[-1]: len(g["params"]) for g in groups}
    assert sizes["head"] == 2 and sizes["base"] > 30


def _tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=2,
    ))


def test_gradual_unfreezing_follows_the_schedule(tiny_models):
    """Which parameters get gradients at which step: head; + top block; + bottom block; + embeddings."""
    spec = parse(manifest(
        tiny_models["encoder"], [{"source": "x.jsonl", "format": "classification"}],
        techniques={"task": CLASSIFY, "transferLearning": {"strategy": "gradual-unfreeze", "unfreeze": {"everySteps": 2}}},
    )).spec
    model = _tiny_classifier()
    plugin = TransferLearning(spec.techniques.transfer_learning, spec)
    ctx = TechniqueContext(spec=spec)
    model = plugin.prepare_model(ctx, model)
    assert all(p.requires_grad for p in model.parameters())  # the optimizer is built over everything
    optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3)
    plugin.on_train_start(ctx)
    batch = {"input_ids": torch.randint(5, 50, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    seen: dict[int, set[str]] = {}
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        seen[step] = {n.split(".")[0] if not n.startswith("bert.") else ".".join(n.split(".")[1:4])
                      for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        ctx.step = step + 1
        plugin.on_step_end(ctx)
    groups = {step: sorted(names) for step, names in seen.items()}
    head = ["classifier"]
    top = head + ["encoder.layer.1", "pooler.dense.bias", "pooler.dense.weight"]
    both = top + ["encoder.layer.0"]
    everything = both + ["embeddings.LayerNorm.bias", "embeddings.LayerNorm.weight", "embeddings.position_embeddings.weight",
                         "embeddings.token_type_embeddings.weight", "embeddings.word_embeddings.weight"]
    assert groups[0] == groups[1] == sorted(head)
    assert groups[2] == groups[3] == sorted(top)
    assert groups[4] == groups[5] == sorted(both)
    assert groups[6] == groups[7] == sorted(everything)


def test_gradual_unfreezing_through_deepspeed_leaves_the_still_frozen_blocks_untouched(tiny_models, tmp_path):
    """ZeRO-2 engine, 3 steps, a stage every 2 steps: the top block trained, the bottom one did not."""
    before = _pretrained(tiny_models["encoder"])
    doc = _job(tiny_models, tmp_path, {"strategy": "gradual-unfreeze", "unfreeze": {"everySteps": 2}}, maxSteps=3)
    doc["spec"]["deepspeed"] = {"zeroStage": 2}
    train(doc, tmp_path)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("bert.encoder.layer.1.", "bert.pooler.")) for k in moved), sorted(moved)
    assert any(k.startswith("bert.encoder.layer.1.") for k in moved)


def test_a_model_whose_head_is_tied_to_the_embeddings_cannot_be_probed(tiny_models):
    spec = parse(manifest(
        tiny_models["causal"], [{"source": "x.jsonl", "format": "text"}],
        techniques={"transferLearning": {"strategy": "linear-probe"}},
    )).spec
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(SpecError) as err:
        TransferLearning(spec.techniques.transfer_learning, spec).prepare_model(TechniqueContext(spec=spec), model)
    assert err.value.problems[0].path == "spec.techniques.transferLearning.strategy"
    assert "tied" in err.value.problems[0].message


def test_new_head_is_reinitialised_from_the_seed(tiny_models):
    spec = parse(manifest(
        tiny_models["encoder"], [{"source": "x.jsonl", "format": "classification"}],
        techniques={"task": CLASSIFY, "transferLearning": {"strategy": "full"}},
    )).spec
    a, b = _tiny_classifier(seed=1), _tiny_classifier(seed=2)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    for m in (a, b):
        TransferLearning(spec.techniques.transfer_learning, spec).prepare_model(TechniqueContext(spec=spec), m)
    assert torch.equal(a.classifier.weight, b.classifier.weight)  # same seed, same fresh head
    assert not torch.equal(a.bert.pooler.dense.weight, b.bert.pooler.dense.weight)  # base untouched


def test_new_head_false_keeps_the_checkpoints_head(tiny_models):
    """transferLearning.newHead: false reuses the head the checkpoint has instead of a fresh one."""
    spec = parse(manifest(
        tiny_models["encoder"], [{"source": "x.jsonl", "format": "classification"}],
        techniques={"task": CLASSIFY, "transferLearning": {"strategy": "full", "newHead": False}},
    )).spec
    model = _tiny_classifier(seed=1)
    head = model.classifier.weight.detach().clone()
    TransferLearning(spec.techniques.transfer_learning, spec).prepare_model(TechniqueContext(spec=spec), model)
    assert torch.equal(model.classifier.weight, head)


def test_blocks_per_stage_unfreezes_that_many_blocks_at_a_time(tiny_models):
    """transferLearning.unfreeze.blocksPerStage: 2 unfreezes both blocks of the 2-layer encoder in one
    stage (head; the top with both blocks; embeddings) where 1 takes two stages."""
    def stages(per: int) -> list[set[str]]:
        spec = parse(manifest(
            tiny_models["encoder"], [{"source": "x.jsonl", "format": "classification"}],
            techniques={"task": CLASSIFY, "transferLearning": {"strategy": "gradual-unfreeze",
                                                                "unfreeze": {"everySteps": 2, "blocksPerStage": per}}},
        )).spec
        plugin = TransferLearning(spec.techniques.transfer_learning, spec)
        plugin.prepare_model(TechniqueContext(spec=spec), _tiny_classifier())
        return [{".".join(n.split(".")[:4]) for n in names} for names in plugin.stages()]

    one, two = stages(1), stages(2)
    assert len(one) == 4 and len(two) == 3
    assert two[0] == one[0] and two[1] == one[1] | one[2] and two[2] == one[3]
    assert {"bert.encoder.layer.0", "bert.encoder.layer.1"} <= two[1]
