"""Every data format and head trains a few steps on a tiny random-init model, saves, and reloads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.support.tiny_models import manifest, write_dataset

# (architecture, format, overrides, transformers class the output reloads with)
CASES = [
    ("llama", "text", {}, "AutoModelForCausalLM"),
    ("gpt2", "instruction", {}, "AutoModelForCausalLM"),
    ("llama", "chat", {}, "AutoModelForCausalLM"),
    ("bert", "classification", {}, "AutoModelForSequenceClassification"),
    ("llama", "classification", {}, "AutoModelForSequenceClassification"),
    ("bert", "token-classification", {}, "AutoModelForTokenClassification"),
    ("t5", "seq2seq", {}, "AutoModelForSeq2SeqLM"),
    ("t5", "instruction", {"model.head": "seq2seq"}, "AutoModelForSeq2SeqLM"),
    ("bert", "question-answering", {}, "AutoModelForQuestionAnswering"),
    ("llama", "text", {"training.packing": True}, "AutoModelForCausalLM"),
    ("llama", "instruction", {"training.packing": True}, "AutoModelForCausalLM"),
    ("gpt2", "text", {"training.gradientCheckpointing": True, "peft.method": "lora"}, None),
]

EMBEDDING_NAMES = ("word_embeddings.weight", "embed_tokens.weight", "wte.weight", "shared.weight")


def _embedding(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The input embedding matrix, whatever prefix the head class puts before it."""
    return next(v for k, v in sorted(state.items()) if k.endswith(EMBEDDING_NAMES))


EXPECTED_METRICS = {
    "text": {"eval_loss", "eval_perplexity"},
    "instruction": {"eval_loss", "eval_perplexity"},
    "chat": {"eval_loss", "eval_perplexity"},
    "classification": {"eval_loss", "eval_accuracy", "eval_f1"},
    "token-classification": {"eval_loss", "eval_accuracy", "eval_f1"},
    "seq2seq": {"eval_loss", "eval_perplexity"},
    "question-answering": {"eval_loss", "eval_exact_match"},
}


@pytest.mark.parametrize(("arch", "fmt", "overrides", "loader"), CASES, ids=[f"{a}-{f}" + "".join(f"-{k.split('.')[-1]}" for k in o if k != "model.head") for a, f, o, _ in CASES])
def test_trains_saves_and_reloads(arch, fmt, overrides, loader, tiny_model_dir, train_job, tmp_path):
    model_dir = tiny_model_dir(arch)
    data = write_dataset(tmp_path / "data.jsonl", fmt, n=32)
    run = train_job(manifest(model_dir, data, fmt, overrides=overrides), tmp_path / "run")
    assert run.rc == 0

    log = run.log()
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in log)
    final = run.checkpoint_state(4)
    assert EXPECTED_METRICS[fmt] <= set(final["metrics"])

    if loader is None:  # an adapter: reloads through PEFT
        import peft

        assert peft.AutoPeftModelForCausalLM.from_pretrained(str(run.output_dir)) is not None
        return
    # The output reloads with the head's class and holds trained (changed) weights.
    reloaded = getattr(transformers, loader).from_pretrained(str(run.output_dir))
    initial = load_file(str(model_dir / "model.safetensors"))
    trained = reloaded.state_dict()
    assert _embedding(trained).shape == _embedding(initial).shape
    assert not torch.equal(_embedding(trained), _embedding(initial))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(run.output_dir))
    assert len(tokenizer) == reloaded.config.vocab_size or len(tokenizer) <= reloaded.config.vocab_size
    if fmt == "classification":
        assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    if fmt == "token-classification":
        assert set(reloaded.config.id2label.values()) == {"LOC", "O", "PER"}
    with torch.no_grad():
        sample = tokenizer("where does alice live", return_tensors="pt")
        if loader == "AutoModelForSeq2SeqLM":
            out = reloaded(**sample, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long))
            assert torch.isfinite(out.logits).all()
        elif loader == "AutoModelForQuestionAnswering":
            assert torch.isfinite(reloaded(**sample).start_logits).all()
        else:
            assert torch.isfinite(reloaded(**sample).logits).all()


def test_output_has_model_card_tensorboard_and_manifest(tiny_model_dir, train_job, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl", "classification", n=32)
    job = manifest(tiny_model_dir("bert"), data, "classification", name="card-check")
    run = train_job(job, tmp_path / "run")
    assert run.rc == 0
    card = (run.output_dir / "README.md").read_text()
    assert "# card-check" in card and "sequence-classification" in card
    assert "kind: FineTuneJob" in card and str(data) in card  # the manifest it was trained from
    assert json.loads((run.output_dir / "kubetune.json").read_text())["spec"]["data"]["datasets"][0]["source"] == str(data)
    assert list((run.output_dir / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.output_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "eval/loss", "eval/accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_classification_learns_the_pattern(tiny_model_dir, train_job, tmp_path):
    """More than running: a few dozen steps on an easy pattern raise eval accuracy."""
    data = write_dataset(tmp_path / "data.jsonl", "classification", n=64)
    job = manifest(tiny_model_dir("bert"), data, "classification", overrides={"training.maxSteps": 40, "training.learningRate": 0.001, "checkpointing.everySteps": 40, "training.logEverySteps": 10})
    run = train_job(job, tmp_path / "run")
    assert run.rc == 0
    before = run.log()[0]["metrics"]["eval_accuracy"]  # the evaluation before training
    after = run.checkpoint_state(40)["metrics"]["eval_accuracy"]
    assert before <= 0.6 and after >= 0.9


def test_several_tasks_get_their_own_metrics(tiny_model_dir, train_job, tmp_path):
    first = write_dataset(tmp_path / "a.jsonl", "classification", n=16, seed=1)
    second = write_dataset(tmp_path / "b.jsonl", "classification", n=16, seed=2)
    job = manifest(tiny_model_dir("bert"), first, "classification")
    job["spec"]["data"]["datasets"] = [
        {"name": "reviews", "source": str(first), "format": "classification"},
        {"name": "tweets", "source": str(second), "format": "classification", "task": "tweets"},
    ]
    run = train_job(job, tmp_path / "run")
    assert run.rc == 0
    metrics = run.checkpoint_state(4)["metrics"]
    assert {"eval_accuracy", "reviews/eval_accuracy", "tweets/eval_accuracy", "tweets/eval_loss"} <= set(metrics)
