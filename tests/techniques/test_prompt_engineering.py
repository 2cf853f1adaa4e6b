"""Technique 4 · prompt engineering: the template is what the model sees; only virtual tokens train."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.techniques.conftest import manifest, parse, train, write_jsonl

ROWS = [{"text": f"the {w} movie was {m}", "label": lab} for w, m, lab in
        [("red", "good", "positive"), ("blue", "bad", "negative"), ("green", "great", "positive"), ("black", "awful", "negative")] * 4]


@pytest.mark.parametrize(
    ("template", "template_format"),
    [("review : {{ text }} sentiment :", "jinja"), ("review : {text} sentiment :", "format")],
)
def test_the_template_is_what_the_model_reads(tiny_models, tokenizer, tmp_path, template, template_format):
    write_jsonl(tmp_path / "reviews.jsonl", ROWS)
    doc = manifest(
        tiny_models["encoder"], [],
        data={"datasets": [{"source": "reviews.jsonl", "format": "classification"}]},
        techniques={"task": {"type": "classification"},
                    "promptEngineering": {"template": template, "templateFormat": template_format}},
        training={"maxSteps": 2, "microBatchSize": 4},
    )
    seen: list[torch.Tensor] = []
    from kubetune.techniques.prompt_engineering.training import PromptEngineering

    def spy(self, ctx, model, batch, outputs, loss):  # what reached the model's forward
        seen.append(batch["input_ids"])
        return loss

    PromptEngineering.compute_loss = spy
    try:
        t = train(doc, tmp_path)
    finally:
        del PromptEngineering.compute_loss
    for features, example in zip(t.train_set.features, t.train_set.examples):
        expected = tokenizer(f"review : {example['_raw']['text']} sentiment :")["input_ids"]
        assert features["input_ids"] == expected
    rows_fed = [row[row != tokenizer.pad_token_id].tolist() for batch in seen for row in batch]
    assert len(rows_fed) == 8
    texts = {tuple(tokenizer(f"review : {r['text']} sentiment :")["input_ids"]) for r in ROWS}
    assert all(tuple(r) in texts for r in rows_fed)
    assert tokenizer.decode(rows_fed[0], skip_special_tokens=True).startswith("review : the")


def test_instruction_template_and_dataset_override(tiny_models, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "red", "response": "cat"}] * 4)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "blue", "response": "dog"}] * 4)
    doc = manifest(
        tiny_models["causal"], [],
        data={"datasets": [
            {"name": "a", "source": "a.jsonl", "format": "instruction"},
            {"name": "b", "source": "b.jsonl", "format": "instruction", "promptTemplate": "color {{ prompt }} ! animal :"},
        ]},
        techniques={"promptEngineering": {"template": "what animal is {{ prompt }} ? answer :"}},
        training={"maxSteps": 1},
    )
    t = train(doc, tmp_path)
    by_dataset = {e["_dataset"]: f for e, f in zip(t.train_set.examples, t.train_set.features)}
    for name, prompt, response in (("a", "what animal is red ? answer :", "cat"), ("b", "color blue ! animal :", "dog")):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert by_dataset[name]["input_ids"] == ids + target
        assert by_dataset[name]["labels"] == [-100] * len(ids) + target


def test_preview_shows_the_rendered_examples(tiny_models, tmp_path):
    from kubetune.trainer.previewing import preview

    write_jsonl(tmp_path / "reviews.jsonl", ROWS)
    doc = manifest(
        tiny_models["encoder"], [],
        data={"datasets": [{"name": "reviews", "source": "reviews.jsonl", "format": "classification"}]},
        techniques={"task": {"type": "classification"}, "promptEngineering": {"template": "review : {{ text }} sentiment :"}},
    )
    shown = preview(parse(doc).spec, tmp_path, limit=2)
    assert shown == [
        "text: review : the red movie was good sentiment :\nlabel: positive",
        "text: review : the blue movie was bad sentiment :\nlabel: negative",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "prefix", "p-tuning"])
def test_only_the_virtual_tokens_train(tiny_models, tmp_path, method):
    rows = [{"prompt": f"what animal is {c}", "response": a} for c, a in zip("red blue green yellow".split(), "cat dog bird fish".split())] * 8
    write_jsonl(tmp_path / "sft.jsonl", rows)
    peft = {"method": method, "numVirtualTokens": 4}
    if method == "prompt":
        peft["initText"] = "what animal is it"
    doc = manifest(
        tiny_models["causal"], [],
        data={"datasets": [{"source": "sft.jsonl", "format": "instruction"}], "eval": {"holdoutFraction": 0.25}},
        peft=peft,
        techniques={"promptEngineering": {"template": "{{ prompt }} ? answer :"}},
        training={"epochs": 6, "learningRate": 3e-2},
    )
    t = train(doc, tmp_path)
    model = t.engine.module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n for n in trainable), sorted(trainable)
    # Every weight of the base model is exactly what the checkpoint holds.
    saved = load_file(str(tiny_models["causal"] / "model.safetensors"))
    base = model.get_base_model().state_dict()
    assert saved.keys() <= base.keys()
    assert all(torch.equal(base[k], saved[k]) for k in saved)
    # The virtual tokens learned something: the eval loss fell.
    assert t.metrics["eval_loss"] < t.initial_metrics["eval_loss"] - 0.2, (t.initial_metrics, t.metrics)


def test_prompt_tuning_starts_from_the_init_text(tiny_models, tokenizer, tmp_path):
    from kubetune.trainer.models import build_model

    doc = manifest(tiny_models["causal"], [{"source": "x.jsonl", "format": "text"}],
                   peft={"method": "prompt", "numVirtualTokens": 6, "initText": "what animal is it"})
    spec = parse(doc).spec
    model = build_model(spec, tmp_path, tokenizer, tiny_models["causal"], None)
    virtual = model.prompt_encoder["default"].embedding.weight.detach()
    words = model.get_input_embeddings().weight.detach()
    ids = tokenizer("what animal is it")["input_ids"]  # as PEFT tokenises it: with [CLS] … [SEP]
    expected = (ids * 6)[:6]
    assert torch.equal(virtual, words[expected])


@pytest.mark.parametrize(("fmt", "row", "task", "target"), [
    ("instruction", {"prompt": "greet", "response": "hallo", "lang": "de"}, None, "response"),
    ("seq2seq", {"source": "hello", "target": "hallo", "lang": "de"}, {"type": "seq2seq"}, "target"),
])
def test_the_response_template_renders_the_target_side(tmp_path, fmt, row, task, target):
    """techniques.promptEngineering.responseTemplate renders the response of instruction rows and the
    target of seq2seq rows from the row's fields."""
    from kubetune.api import parse_spec
    from kubetune.techniques.prompt_engineering.training import PromptEngineering
    from kubetune.trainer.encoding import load_examples
    from kubetune.trainer.techniques.base import TechniqueContext

    write_jsonl(tmp_path / "rows.jsonl", [row])
    techniques = {"promptEngineering": {"responseTemplate": "[{{ lang }}] {{ %s }}" % target}, **({"task": task} if task else {})}
    spec = parse_spec({"model": {"source": "m"}, "data": {"datasets": [{"source": "rows.jsonl", "format": fmt}]},
                       "techniques": techniques})
    [example] = load_examples(spec, tmp_path).train
    [rendered] = PromptEngineering(spec.techniques.prompt_engineering, spec).transform_examples(
        TechniqueContext(spec=spec), [example], "train")
    assert rendered[target] == "[de] hallo" and example[target] == "hallo"
