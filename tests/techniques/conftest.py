"""Fixtures of the technique tests: a tiny tokenizer, tiny random-init models, and one-call training.

Everything is built locally, once per session: a WordPiece tokenizer built with ``tokenizers``
over :data:`WORDS` (every word a single token; anything else falls back to characters), and
2-layer, hidden-64 models saved next to it — ``causal`` (Llama), ``encoder`` (BERT, for the
classification, NER and QA heads) and ``seq2seq`` (T5). :func:`train` runs the real training loop
(``kubetune.trainer.training.Trainer``, DeepSpeed on CPU, one process) on a manifest given as a dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]

#: The words test data is made of (each one token of the tiny tokenizer).
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


def _train_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # The vocabulary is written out rather than trained: trainers break frequency ties in hash order,
    # which differs between processes, and the tests' numbers should not.
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]{}<>-_/#=+*&%$@")
    words = list(dict.fromkeys(WORDS + [w.capitalize() for w in WORDS]))
    tokens = list(dict.fromkeys(SPECIALS + chars + [f"##{c}" for c in chars] + words))
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
    return fast


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random-init models (with the tokenizer): causal, encoder, seq2seq."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("tiny-models")
    tok = _train_tokenizer(root / "tokenizer")
    vocab = len(tok)
    torch.manual_seed(0)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    models = {
        "causal": LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False, **ids)),
        "encoder": BertModel(BertConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, pad_token_id=tok.pad_token_id)),
        "seq2seq": T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)),
    }
    out = {}
    for name, model in models.items():
        folder = root / name
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        out[name] = folder
    out["tokenizer"] = root / "tokenizer"
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_models: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["tokenizer"]))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def manifest(model: Path, datasets: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A FineTuneJob manifest (dict) with CPU-friendly defaults; ``spec`` keys override."""
    body: dict[str, Any] = {
        "model": {"source": str(model)},
        "data": {"datasets": datasets},
        "training": {"learningRate": 1e-3, "microBatchSize": 8, "maxSeqLength": 64, "logEverySteps": 1000, "lrScheduler": "constant"},
        "deepspeed": {"zeroStage": 0},
        "checkpointing": {"everySteps": 100000, "keepLast": 1},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": body}


def parse(document: dict[str, Any]) -> Any:
    from kubetune.api import parse_job

    return parse_job(document)


def train(document: dict[str, Any], workdir: Path) -> Any:
    """Train a manifest to the end in this process; returns the finished Trainer (cleaned up)."""
    from kubetune.trainer.running import RunOptions, RunPaths
    from kubetune.trainer.training import Trainer

    job = parse(document)
    paths = RunPaths(base_dir=workdir, output_dir=workdir / "out", checkpoint_dir=workdir / "ckpt", run_dir=workdir)
    trainer = Trainer(job, paths, RunOptions(local=True, progress=False))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer
