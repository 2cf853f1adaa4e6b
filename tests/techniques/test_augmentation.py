"""Technique 12 · augmentation: deterministic for a seed, labels preserved, applied at the configured rate,
and it lifts held-out accuracy on a small-data task, seed by seed."""

from __future__ import annotations

import random

import pytest

from kubetune.techniques.augmentation.training import Augmentation, delete_words, swap_words
from tests.techniques.conftest import manifest, parse, train, write_jsonl

WORDS = "the red movie was good and the blue film was bad but the day is nice".split()


def _setup(doc, workdir, run="run"):
    """A Trainer set up (data encoded, model built) but not trained; cleaned up by the caller."""
    from kubetune.trainer.running import RunOptions, RunPaths
    from kubetune.trainer.training import Trainer

    out = workdir / run
    paths = RunPaths(base_dir=workdir, output_dir=out / "out", checkpoint_dir=out / "ckpt", run_dir=out)
    trainer = Trainer(parse(doc), paths, RunOptions(local=True, progress=False))
    trainer.setup()
    return trainer


def _reviews(tmp_path, n=40):
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(10)), "label": rng.choice(["positive", "negative"])} for _ in range(n)]
    write_jsonl(tmp_path / "reviews.jsonl", rows)
    return rows


def _classification(tiny_models, augmentation, **training):
    return manifest(
        tiny_models["encoder"], [],
        data={"datasets": [{"source": "reviews.jsonl", "format": "classification"}]},
        techniques={"task": {"type": "classification"}, "augmentation": augmentation},
        training={"maxSteps": 1, **training},
    )


def _stream(dataset, epochs):
    out = []
    for epoch in range(epochs):
        dataset.epoch = epoch
        out.extend(dataset[i] for i in range(len(dataset)))
    return out


def test_deterministic_for_a_seed_and_different_across_seeds_and_epochs(tiny_models, tmp_path):
    _reviews(tmp_path)
    aug = {"randomSwap": {"p": 0.5, "rate": 0.3}, "tokenMasking": {"p": 0.5, "rate": 0.2}, "seed": 7}
    streams = {}
    for name, cfg in (("a", aug), ("b", aug), ("other-seed", {**aug, "seed": 8})):
        t = _setup(_classification(tiny_models, cfg), tmp_path, name)
        try:
            streams[name] = [item["input_ids"] for item in _stream(t.train_set, 2)]
        finally:
            t.cleanup()
    assert streams["a"] == streams["b"]
    assert streams["a"] != streams["other-seed"]
    n = len(streams["a"]) // 2
    assert streams["a"][:n] != streams["a"][n:]  # on the fly: epoch 2 is augmented afresh


def test_labels_are_preserved_and_the_rate_is_as_configured(tiny_models, tokenizer, tmp_path):
    _reviews(tmp_path, n=100)
    t = _setup(_classification(tiny_models, {"tokenMasking": {"p": 0.3, "rate": 0.2}}), tmp_path)
    try:
        originals = t.train_set.features
        changed, fractions = 0, []
        stream = _stream(t.train_set, 20)
        for k, item in enumerate(stream):
            base = originals[k % len(originals)]
            assert item["labels"] == base["labels"]  # the class never changes
            assert len(item["input_ids"]) == len(base["input_ids"])
            diff = [a != b for a, b in zip(item["input_ids"], base["input_ids"])]
            if any(diff):
                changed += 1
                assert all(item["input_ids"][i] == tokenizer.mask_token_id for i, d in enumerate(diff) if d)
                fractions.append(sum(diff) / (len(diff) - 2))  # [CLS]/[SEP] are never touched
    finally:
        t.cleanup()
    assert changed / len(stream) == pytest.approx(0.3, abs=0.04)
    assert sum(fractions) / len(fractions) == pytest.approx(0.2, abs=0.03)


def test_instruction_responses_are_never_edited(tiny_models, tmp_path):
    rows = [{"prompt": "the red movie was good and the day is nice", "response": "cat dog bird"}] * 20
    write_jsonl(tmp_path / "sft.jsonl", rows)
    doc = manifest(
        tiny_models["causal"], [], data={"datasets": [{"source": "sft.jsonl", "format": "instruction"}]},
        techniques={"augmentation": {"randomDelete": {"p": 1.0, "rate": 0.3}, "tokenDropout": {"p": 1.0, "rate": 0.3}}},
        training={"maxSteps": 1},
    )
    t = _setup(doc, tmp_path)
    try:
        base = t.train_set.features[0]
        target = [x for x in base["labels"] if x != -100]
        for item in _stream(t.train_set, 3):
            assert [x for x in item["labels"] if x != -100] == target
            assert len(item["input_ids"]) < len(base["input_ids"])
            assert item["input_ids"][-len(target):] == target
    finally:
        t.cleanup()


def test_word_edits_move_ner_tags_with_their_words():
    rng = random.Random(0)
    for _ in range(50):
        words = [f"w{i}" for i in range(8)]
        tags = [f"t{i}" for i in range(8)]
        swap_words(words, 0.5, rng, tags)
        delete_words(words, 0.3, rng, tags)
        assert [w[1:] for w in words] == [t[1:] for t in tags]
        assert 1 <= len(words) < 8


def test_synonyms_from_a_user_file_and_template_paraphrase(tiny_models, tokenizer, tmp_path):
    (tmp_path / "synonyms.txt").write_text("# sets\ngood, great, nice\nmovie, film\n")
    write_jsonl(tmp_path / "reviews.jsonl", [{"text": "the movie was good", "label": "positive"}] * 10)
    aug = {
        "synonyms": {"file": "synonyms.txt", "p": 1.0, "rate": 1.0},
        "templateParaphrase": {"p": 1.0, "templates": ["review : {{ text }} !"]},
    }
    doc = _classification(tiny_models, aug)
    doc["spec"]["techniques"]["promptEngineering"] = {"template": "the text : {{ text }}"}
    t = _setup(doc, tmp_path)
    try:
        texts = {tokenizer.decode(item["input_ids"], skip_special_tokens=True) for item in _stream(t.train_set, 2)}
    finally:
        t.cleanup()
    squeezed = {text.replace(" ", "") for text in texts}  # decoding glues punctuation to words
    assert squeezed == {f"review:thefilmwas{g}!" for g in ("great", "nice")}
    assert len(texts) == 2


def test_a_bad_synonym_file_names_the_field(tiny_models, tmp_path):
    _reviews(tmp_path)
    doc = _classification(tiny_models, {"synonyms": {"file": "missing.txt"}})
    with pytest.raises(ValueError, match=r"spec.techniques.augmentation.synonyms.file"):
        Augmentation(parse(doc).spec.techniques.augmentation, parse(doc).spec).transform_examples(
            __import__("kubetune.trainer.techniques.base", fromlist=["TechniqueContext"]).TechniqueContext(spec=None, base_dir=tmp_path), [], "train")


SENTIMENT_SETS = {"positive": ["good", "great", "nice", "lovely", "happy"], "negative": ["bad", "awful", "terrible", "boring", "sad"]}
REVIEW_FILLER = "the a of is was it this that day night big small hot cold movie film book food".split()


def _small_data_reviews(n: int, cue_words: int, seed: int) -> list[dict]:
    """``n`` reviews, classes alternating: five filler words and one cue word drawn from the first
    ``cue_words`` members of its class's synonym set."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["positive", "negative"][i % 2]
        words = [rng.choice(REVIEW_FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), rng.choice(SENTIMENT_SETS[label][:cue_words]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.mark.slow
def test_synonym_augmentation_lifts_held_out_accuracy_on_small_data(tiny_models, tmp_path):
    """32 training reviews whose only cue words are "good" and "bad"; held-out reviews use all five
    words of each synonym set (as users write). Trained the same 60 steps on the same rows, once
    plain and once with ``synonyms`` (p 0.9) from a user file of those sets: without augmentation
    the unseen cue words are noise to the model, with it they are learned from the same 32 rows.

    Measured held-out accuracy, plain → augmented: seed 0 0.56 → 0.95, seed 1 0.61 → 0.88,
    seed 2 0.52 → 0.92 (not run here: seed 3 0.62 → 0.89, 4 0.58 → 0.94, 5 0.54 → 0.94). Token masking
    (p 0.5, rate 0.3) with random deletion (p 0.3, rate 0.2) instead, on 16 reviews that use every cue
    word, did not help (0.69/0.73/0.57 → 0.61/0.64/0.66): this test claims the effect of synonyms only.
    """
    synonyms = "".join(", ".join(words) + "\n" for words in SENTIMENT_SETS.values())
    results: dict[int, dict[str, float]] = {}
    for seed in (0, 1, 2):
        results[seed] = {}
        for name, techniques in (("plain", {}), ("augmented", {"augmentation": {"synonyms": {"file": "synonyms.txt", "p": 0.9, "rate": 1.0}}})):
            folder = tmp_path / f"seed-{seed}" / name
            write_jsonl(folder / "train.jsonl", _small_data_reviews(32, cue_words=1, seed=seed))
            write_jsonl(folder / "eval.jsonl", _small_data_reviews(100, cue_words=5, seed=seed + 1000))
            (folder / "synonyms.txt").write_text(synonyms)
            doc = manifest(
                tiny_models["encoder"], [],
                data={"datasets": [{"source": "train.jsonl", "format": "classification"}],
                      "eval": {"datasets": [{"source": "eval.jsonl", "format": "classification"}]}},
                techniques={"task": {"type": "classification"}, **techniques},
                training={"maxSteps": 60, "seed": seed},
            )
            t = train(doc, folder)
            results[seed][name] = t.metrics["eval_accuracy"]
            if name == "augmented":  # the plugin really edited the stream (about 0.9 of what was drawn)
                plugin = next(x for x in t.techniques if x.name == "augmentation")
                assert plugin.stats["augmented"] > 0.8 * plugin.stats["seen"], plugin.stats
    print(results)
    for seed, r in results.items():
        assert r["augmented"] >= r["plain"] + 0.2, (seed, r)
        assert r["augmented"] >= 0.85, (seed, r)
        assert r["plain"] <= 0.7, (seed, r)  # the baseline really cannot read the unseen cue words
