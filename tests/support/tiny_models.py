"""Tiny random-init models, tokenizers and datasets for trainer and technique tests (no hub, CPU).

The one place tests get a model from. Used by ``tests/trainer`` (through the fixtures in
``tests/trainer/conftest.py``), by ``tests/techniques`` (the ``tiny_models`` fixture in
``tests/techniques/conftest.py`` builds its causal/encoder/seq2seq trio with :func:`tiny_model`
over a :func:`word_tokenizer`) and by ``tests/e2e``:

* :func:`tiny_tokenizer` — a WordPiece tokenizer trained here with ``tokenizers`` on
  :data:`CORPUS`, saved as a fast tokenizer with a chat template; ``style`` "bert" wraps
  sequences in [CLS] … [SEP], "causal" adds nothing (bos ``<s>``, eos ``</s>``), "t5" appends
  ``</s>``.
* :func:`word_tokenizer` — a cased WordPiece tokenizer whose vocabulary is written out, not
  trained: every word of :data:`WORDS` is one token, anything else falls back to characters, and
  every sequence is wrapped in [CLS] … [SEP]. The technique tests read their effects in words
  (augmentation swaps and masks words, prompt templates are decoded back to text), so they use
  this one; the trainer tests were written against the trained one. Both stay: moving either suite
  to the other tokenizer changes every number its effect tests were checked with.
* :func:`tiny_model` — a 2-layer, hidden-64 model of an architecture (``llama``, ``gpt2``,
  ``bert``, ``t5``) saved with its tokenizer into a folder, ready to be ``spec.model.source``.
* :func:`write_dataset` / :func:`write_jsonl` — a small jsonl dataset of a format (text,
  instruction, chat, classification, token-classification, seq2seq, preference,
  question-answering) with a pattern a tiny model can pick up within a few dozen steps / any rows.
* :func:`manifest` — a FineTuneJob manifest (dict) training such a model on such data, with
  fast defaults (zero stage 0, fp32, a few steps) and overrides by dotted camelCase path.

Everything is deterministic (fixed seeds); a folder built once per session is reused.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "gpt2", "bert", "t5")

_WORDS = (
    "the a an is was good bad great terrible fine awful movie film product food service place book phone "
    "i you we they it this that love hate like dislike really very not quite so and or but with without "
    "paris london berlin rome alice bob carol dave city person works lives in at on of to from for "
    "what where who when how which question answer context summary translate english french hello world "
    "red blue green yellow cat dog bird fish one two three four five six seven eight nine ten positive negative "
    "user assistant system instruction input response output chosen rejected yes no please thanks"
).split()

CORPUS = [" ".join(random.Random(i).choices(_WORDS, k=12)) for i in range(400)] + [" ".join(_WORDS)]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def tiny_tokenizer(folder: Path, style: str = "bert") -> Path:
    """Train and save a fast WordPiece tokenizer in ``folder`` (see the module doc); returns it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return folder
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIALS))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
        kwargs = dict(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])])
        kwargs = dict(eos_token="</s>")
    elif style == "causal":
        kwargs = dict(bos_token="<s>", eos_token="</s>")
    else:
        raise ValueError(f"style: one of bert, t5, causal; got {style!r}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", **kwargs)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


#: The words of :func:`word_tokenizer` (each one token of it).
WORDS = (
    "the a an of to and is was it this that good bad great awful fine poor happy sad love hate movie film book "
    "food day night red blue green yellow black white cat dog bird fish horse cow apple banana cherry grape lemon "
    "one two three four five six seven eight nine ten zero yes no up down left right big small hot cold "
    "alice bob carol dave paris london rome berlin tokyo person city other review sentiment label positive negative "
    "text answer question context translate summarise instruction input response output task copy reverse "
    "sum count color animal fruit number name where who what says said likes lives in at on with from "
    "sunny rainy weather today tomorrow very really quite nice terrible lovely boring fun dull bright dark "
    "topic sports music politics game team song vote win lose play sing tune beat law court "
    "happy joyful glad sad unhappy gloomy quick fast rapid slow sluggish"
).split()

_WORD_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]


def word_tokenizer(folder: Path, words: list[str] | None = None) -> Path:
    """Save in ``folder`` the written-out-vocabulary tokenizer of ``words`` (default :data:`WORDS`;
    see the module doc); returns it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # The vocabulary is written out rather than trained: trainers break frequency ties in hash order,
    # which differs between processes, and the tests' numbers should not.
    words = WORDS if words is None else words
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]{}<>-_/#=+*&%$@")
    cased = list(dict.fromkeys(words + [w.capitalize() for w in words]))
    tokens = list(dict.fromkeys(_WORD_SPECIALS + chars + [f"##{c}" for c in chars] + cased))
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[BOS]", eos_token="[EOS]",
    )
    fast.save_pretrained(str(folder))
    return Path(folder)


def _config(arch: str, vocab: int, tok: Any, **overrides: Any) -> Any:
    import transformers

    common = dict(vocab_size=vocab, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        kind, fields = transformers.LlamaConfig, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **common,
        )
    elif arch == "gpt2":
        kind, fields = transformers.GPT2Config, dict(
            n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **common,
        )
    elif arch == "bert":
        kind, fields = transformers.BertConfig, dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=512, **common,
        )
    elif arch == "t5":
        kind, fields = transformers.T5Config, dict(
            d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **common,
        )
    else:
        raise ValueError(f"arch: one of {ARCHITECTURES}; got {arch!r}")
    return kind(**{**fields, **overrides})


_MODEL_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel", "t5": "T5ForConditionalGeneration"}
_STYLE = {"llama": "causal", "gpt2": "causal", "bert": "bert", "t5": "t5"}


def tiny_model(folder: Path, arch: str = "llama", seed: int | None = 0, *, tokenizer: Path | None = None, **config: Any) -> Path:
    """A 2-layer, hidden-64 random-init model of ``arch`` and its tokenizer, saved in ``folder``.

    ``tokenizer``: a saved tokenizer folder to use (default: :func:`tiny_tokenizer` in the style of
    ``arch``); ``config``: fields of the model config that differ from the defaults here;
    ``seed=None`` draws the weights from torch's generator as it stands (several models from one seed).
    """
    import shutil

    import torch
    import transformers

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    if tokenizer is None:
        tiny_tokenizer(folder, _STYLE[arch])
    else:
        folder.mkdir(parents=True, exist_ok=True)
        for f in Path(tokenizer).iterdir():
            shutil.copy(f, folder / f.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASS[arch])(_config(arch, len(tok), tok, **config))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


# --- data ----------------------------------------------------------------------------------------

_NAMES = ["alice", "bob", "carol", "dave"]
_CITIES = ["paris", "london", "berlin", "rome"]


def dataset_rows(fmt: str, n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows of ``fmt`` with an easy pattern (see the module doc)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        name, city = rng.choice(_NAMES), rng.choice(_CITIES)
        good = i % 2 == 0
        mood = rng.choice(["good great fine", "love like"]) if good else rng.choice(["bad terrible awful", "hate dislike"])
        if fmt == "text":
            rows.append({"text": f"{name} lives in {city} and {name} works in {city}"})
        elif fmt == "instruction":
            rows.append({"instruction": f"where does {name} live", "input": "", "output": f"{name} lives in {city}"})
        elif fmt == "chat":
            rows.append({"messages": [{"role": "user", "content": f"where does {name} live"}, {"role": "assistant", "content": f"in {city}"}]})
        elif fmt == "classification":
            rows.append({"text": f"this movie was {mood} really", "label": "positive" if good else "negative"})
        elif fmt == "token-classification":
            words = ["the", name, "lives", "in", city]
            rows.append({"tokens": words, "tags": ["O", "PER", "O", "O", "LOC"]})
        elif fmt == "seq2seq":
            rows.append({"source": f"translate {name} lives in {city}", "target": f"{city} {name}"})
        elif fmt == "preference":
            rows.append({"prompt": f"where does {name} live", "chosen": f"in {city}", "rejected": "no"})
        elif fmt == "question-answering":
            context = f"{name} lives in {city} with a cat"
            rows.append({"question": f"where does {name} live", "context": context, "answer": city})
        else:
            raise ValueError(f"format {fmt!r}")
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as a jsonl file at ``path`` (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_dataset(path: Path, fmt: str, n: int = 32, seed: int = 0) -> Path:
    return write_jsonl(path, dataset_rows(fmt, n, seed))


#: The head each format trains by default in these tests, and the task type that selects it.
FORMAT_TASKS = {
    "text": None,
    "instruction": "instruction",
    "chat": None,
    "classification": "classification",
    "token-classification": "token-classification",
    "seq2seq": "seq2seq",
    "question-answering": "question-answering",
}


def _set(body: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        body = body.setdefault(key, {})
    body[keys[-1]] = value


def manifest(
    model_dir: Path | str,
    data: Path | str,
    fmt: str,
    *,
    name: str = "tiny",
    task: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A FineTuneJob manifest training ``model_dir`` on ``data`` (see the module doc).

    ``overrides`` maps dotted paths under ``spec`` (camelCase, e.g. ``"training.maxSteps"``) to
    values; a value of None removes the key.
    """
    spec: dict[str, Any] = {
        "model": {"source": str(model_dir)},
        "data": {"datasets": [{"name": "d", "source": str(data), "format": fmt}], "eval": {"holdoutFraction": 0.25}},
        "training": {
            "maxSteps": 4, "learningRate": 5e-3, "microBatchSize": 4, "maxSeqLength": 64, "logEverySteps": 1,
            "precision": "fp32", "warmupSteps": 0, "lrScheduler": "constant",
        },
        "deepspeed": {"zeroStage": 0},
        "checkpointing": {"everySteps": 2},
    }
    task = task if task is not None else FORMAT_TASKS.get(fmt)
    if task:
        spec["techniques"] = {"task": {"type": task}}
    for dotted, value in (overrides or {}).items():
        if value is None:
            parent = spec
            keys = dotted.split(".")
            for key in keys[:-1]:
                parent = parent.get(key, {})
            parent.pop(keys[-1], None)
        else:
            _set(spec, dotted, copy.deepcopy(value))
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
