"""Technique 11 · regularisation: each term enters the loss with its weight, and has its effect.

The term checks drive the plugin's ``compute_loss`` on one batch and recompute each term
independently; the effect checks train the same job twice through the real loop (DeepSpeed on
CPU), with and without the term, and compare the trained weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertForSequenceClassification

from kubetune.trainer.techniques.base import TechniqueContext
from kubetune.techniques.regularization.training import Regularization
from tests.techniques.conftest import manifest, parse, train
from tests.techniques.reviews import CLASSIFY, review_files


def _spec(tiny_models, regularization):
    return parse(manifest(
        tiny_models["encoder"], [{"source": "x.jsonl", "format": "classification"}],
        techniques={"task": CLASSIFY, "regularization": regularization},
    )).spec


def _model(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    ))


BATCH = {"input_ids": torch.randint(5, 50, (4, 8), generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 1, 1, 0])}


def test_each_term_enters_the_loss_with_its_configured_weight(tiny_models):
    spec = _spec(tiny_models, {"l1": 1e-4, "l2Sp": 0.5, "labelSmoothing": 0.2})
    model = _model()
    plugin = Regularization(spec.techniques.regularization, spec)
    ctx = TechniqueContext(spec=spec, head="sequence-classification")
    plugin.prepare_model(ctx, model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # move the weights away from their start so that L2-SP is not zero
        for p in model.parameters():
            p.add_(0.01)
    outputs = model(**BATCH)
    total = plugin.compute_loss(ctx, model, BATCH, outputs, outputs.loss)

    decayed = [n for n in w0 if not (n.endswith("bias") or "LayerNorm" in n)]
    l1 = 1e-4 * sum(model.get_parameter(n).abs().sum() for n in decayed)
    l2_sp = 0.5 * sum((model.get_parameter(n) - w0[n]).pow(2).sum() for n in w0 if not n.startswith("classifier."))
    smoothing = F.cross_entropy(outputs.logits, BATCH["labels"], label_smoothing=0.2) - F.cross_entropy(outputs.logits, BATCH["labels"])
    assert ctx.loss_terms["l1"] == pytest.approx(float(l1.detach()), rel=1e-5)
    assert ctx.loss_terms["l2_sp"] == pytest.approx(float(l2_sp.detach()), rel=1e-5)
    assert ctx.loss_terms["label_smoothing"] == pytest.approx(float(smoothing.detach()), rel=1e-5)
    assert float(total) == pytest.approx(float((outputs.loss + l1 + l2_sp + smoothing).detach()), rel=1e-5)
    # The terms are differentiable: L2-SP pulls every base weight back towards its start.
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_decoupled_weight_decay_exempts_biases_and_norms(tiny_models, tmp_path):
    doc = manifest(
        tiny_models["encoder"], [], data=review_files(tmp_path),
        techniques={"task": CLASSIFY, "regularization": {"weightDecay": 0.05}}, training={"maxSteps": 1},
    )
    t = train(doc, tmp_path)
    names = {id(p): n for n, p in t.engine.module.named_parameters()}
    by_decay: dict[float, set[str]] = {}
    for group in t.engine.optimizer.param_groups:
        by_decay.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    assert set(by_decay) == {0.0, 0.05}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in by_decay[0.0])
    assert all(not (n.endswith("bias") or "LayerNorm" in n) for n in by_decay[0.05])
    assert isinstance(t.engine.optimizer, torch.optim.AdamW) or "AdamW" in type(t.engine.optimizer).__name__


def test_no_decay_patterns_choose_the_parameters_exempt_from_weight_decay(tiny_models):
    """techniques.regularization.noDecayPatterns replaces the default exemptions (biases, norms)."""
    from kubetune.trainer.optimizing import default_param_groups

    spec = _spec(tiny_models, {"weightDecay": 0.05, "noDecayPatterns": ["*embeddings*"]})
    model = _model()
    groups = Regularization(spec.techniques.regularization, spec).param_groups(
        TechniqueContext(spec=spec), model, default_param_groups(model, spec))
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert by_decay[0.0] == {n for n in names.values() if "embeddings" in n}
    assert "bert.encoder.layer.0.attention.self.query.bias" in by_decay[0.05]  # a bias decays now
    assert by_decay[0.0] | by_decay[0.05] == set(names.values())


def test_dropout_override_reaches_every_dropout(tiny_models):
    spec = _spec(tiny_models, {"dropout": 0.3})
    model = _model(dropout=0.1)
    Regularization(spec.techniques.regularization, spec).prepare_model(TechniqueContext(spec=spec), model)
    ps = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and all(p == 0.3 for p in ps)
    assert model.config.hidden_dropout_prob == 0.3 and model.config.attention_probs_dropout_prob == 0.3


def _train_weights(tiny_models, tmp_path, regularization, name):
    folder = tmp_path / name
    folder.mkdir()
    doc = manifest(
        tiny_models["encoder"], [], data=review_files(folder),
        techniques={"task": CLASSIFY, **({"regularization": regularization} if regularization else {})},
        training={"maxSteps": 12, "learningRate": 1e-2},
    )
    train(doc, folder)
    return load_file(str(folder / "out" / "model.safetensors"))


def test_l2_sp_ends_closer_to_the_pretrained_weights_and_l1_drives_weights_to_zero(tiny_models, tmp_path):
    start = {f"bert.{k}": v for k, v in AutoModel.from_pretrained(str(tiny_models["encoder"])).state_dict().items()}
    plain = _train_weights(tiny_models, tmp_path, None, "plain")
    l2_sp = _train_weights(tiny_models, tmp_path, {"l2Sp": 1.0}, "l2sp")
    l1 = _train_weights(tiny_models, tmp_path, {"l1": 1e-3}, "l1")

    def distance(weights):
        return float(sum((weights[k] - start[k]).pow(2).sum() for k in start) ** 0.5)

    assert distance(l2_sp) < 0.5 * distance(plain), (distance(l2_sp), distance(plain))

    def near_zero(weights):
        matrices = [v for k, v in weights.items() if k.startswith("bert.encoder.") and v.dim() == 2]
        flat = torch.cat([m.flatten() for m in matrices])
        return float((flat.abs() < 2e-3).float().mean())

    assert near_zero(l1) > 2 * near_zero(plain), (near_zero(l1), near_zero(plain))
