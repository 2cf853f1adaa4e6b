"""Fixtures of the technique tests: a tiny tokenizer, tiny random-init models, and one-call training.

The models and the tokenizer come from ``tests.support.tiny_models`` (the one module that builds
test models): a :func:`~tests.support.tiny_models.word_tokenizer` (every word of ``WORDS`` a
single token; anything else falls back to characters) and 2-layer, hidden-64 models saved next to
it, built once per session — ``causal`` (Llama), ``encoder`` (BERT, for the classification, NER and
QA heads) and ``seq2seq`` (T5). :func:`train` runs the real training loop
(``kubetune.trainer.training.Trainer``, DeepSpeed on CPU, one process) on a manifest given as a dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.tiny_models import WORDS, tiny_model, word_tokenizer, write_jsonl

__all__ = ["WORDS", "manifest", "parse", "train", "write_jsonl"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random-init models (with the tokenizer): causal, encoder, seq2seq."""
    import torch

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = word_tokenizer(root / "tokenizer")
    torch.manual_seed(0)  # one seed for the three, drawn in this order
    return {
        "causal": tiny_model(root / "causal", "llama", seed=None, tokenizer=tokenizer,
                             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False),
        "encoder": tiny_model(root / "encoder", "bert", seed=None, tokenizer=tokenizer, max_position_embeddings=256),
        "seq2seq": tiny_model(root / "seq2seq", "t5", seed=None, tokenizer=tokenizer),
        "tokenizer": tokenizer,
    }


@pytest.fixture(scope="session")
def tokenizer(tiny_models: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["tokenizer"]))


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
