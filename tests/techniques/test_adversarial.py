"""Technique 7 · adversarial fine-tuning: the adversarial loss is back-propagated, and it buys robustness.

One-batch checks drive the plugin's hooks on a tiny causal LM: each method's adversarial loss is
computed, exceeds the clean loss, and changes the gradients of the single backward; NEFTune noise
is bounded by alpha/sqrt(L·d) and absent at evaluation. The effect check trains the same job
twice through the real loop (plain, and FGM) and adds Gaussian noise to the input embeddings of
held-out text at test time: the adversarially trained model's loss rises less.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune.techniques.adversarial.training import Adversarial
from kubetune.trainer.techniques.base import TechniqueContext
from tests.techniques.conftest import manifest, parse, train, write_jsonl
from tests.techniques.reviews import review_rows


def _spec(tiny_models, adversarial):
    return parse(manifest(tiny_models["causal"], [{"source": "x.jsonl", "format": "text"}], techniques={"adversarial": adversarial})).spec


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    ))


def _batch():
    ids = torch.randint(3, 60, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_the_adversarial_loss_is_computed_and_back_propagated(tiny_models, method):
    batch = _batch()
    plain = _model()
    plain(**batch).loss.backward()
    plain_grads = _grads(plain)

    spec = _spec(tiny_models, {"method": method, "epsilon": 0.5, "stepSize": 0.2, "steps": 3})
    model = _model()
    plugin = Adversarial(spec.techniques.adversarial, spec)
    ctx = TechniqueContext(spec=spec, device="cpu")
    model = plugin.prepare_model(ctx, model)
    model.train()
    outputs = model(**batch)
    loss = plugin.compute_loss(ctx, model, batch, outputs, outputs.loss)
    # Finding the perturbation touched no parameter's .grad: the loop's one backward does it all.
    assert all(p.grad is None for p in model.parameters())
    assert ctx.loss_terms["adversarial"] > float(outputs.loss)  # the perturbation raises the loss
    assert 0 < ctx.loss_terms["perturbation_norm"] <= 0.5 + 1e-5  # inside the epsilon ball
    assert float(loss) == pytest.approx(float(outputs.loss) + ctx.loss_terms["adversarial"], rel=1e-5)
    loss.backward()
    grads = _grads(model)
    assert set(grads) == set(plain_grads)
    assert any(not torch.allclose(grads[n], plain_grads[n], atol=1e-6) for n in grads)
    # Evaluation forwards are never perturbed: the hooked model gives what the bare one gives.
    model.eval()
    with torch.no_grad():
        hooked = model(**batch).logits
        plugin.handle.remove()
        assert torch.equal(hooked, model(**batch).logits)


def test_neftune_noise_is_bounded_and_only_in_training(tiny_models):
    spec = _spec(tiny_models, {"method": "none", "neftuneAlpha": 5.0})
    model = _model()
    plugin = Adversarial(spec.techniques.adversarial, spec)
    plugin.prepare_model(TechniqueContext(spec=spec), model)
    embedding = model.get_input_embeddings()
    ids = _batch()["input_ids"]
    seen = []
    embedding.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))  # runs after the noise hook
    clean = torch.nn.functional.embedding(ids, embedding.weight).detach()
    model.train()
    model(input_ids=ids)
    noise = seen[-1] - clean
    bound = 5.0 / (10 * 64) ** 0.5
    assert float(noise.abs().max()) <= bound + 1e-6 and float(noise.abs().max()) > 0.5 * bound
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(seen[-1], clean)


def _noisy_loss_increase(trainer, sigma: float, draws: int = 8) -> float:
    from kubetune.trainer.batching import model_inputs

    model = trainer.engine.module.eval()
    batch = model_inputs(trainer.collate([trainer.eval_set[i] for i in range(len(trainer.eval_set))]), "cpu")
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        clean = float(model(**batch).loss)
        generator = torch.Generator().manual_seed(123)
        noisy = []
        for _ in range(draws):
            embeds = embedding(batch["input_ids"])
            embeds = embeds + sigma * torch.randn(embeds.shape, generator=generator)
            noisy.append(float(model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss))
    return sum(noisy) / draws - clean


@pytest.mark.slow
def test_under_embedding_noise_the_adversarially_trained_model_degrades_less(tiny_models, tmp_path):
    runs = {}
    for name, techniques in (("plain", {}), ("fgm", {"adversarial": {"method": "fgm", "epsilon": 1.0}})):
        folder = tmp_path / name
        folder.mkdir()
        write_jsonl(folder / "text.jsonl", [{"text": r["text"]} for r in review_rows(160, 3)])
        write_jsonl(folder / "held-out.jsonl", [{"text": r["text"]} for r in review_rows(48, 1003)])
        doc = manifest(
            tiny_models["causal"], [],
            data={"datasets": [{"source": "text.jsonl", "format": "text"}], "eval": {"datasets": [{"source": "held-out.jsonl", "format": "text"}]}},
            techniques=techniques, training={"maxSteps": 30, "learningRate": 5e-3},
        )
        runs[name] = train(doc, folder)
    plain, fgm = (_noisy_loss_increase(runs[n], sigma=0.2) for n in ("plain", "fgm"))
    assert plain > 0.05, plain  # the noise matters to the plain model
    assert fgm < 0.5 * plain, (fgm, plain)
