"""Evaluation metrics are the libraries' (torchmetrics, seqeval), over the whole eval set on every rank.

A fake model "predicts" the tag stored in each input id, so the expected numbers are computed by
hand on a two-sentence NER example: entity-level F1 (seqeval) is 2/3, where token-level macro F1
over the tags including ``O`` would be about 0.77.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
#            gold                                  predicted
SENTENCES = [(["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "O", "O", "B-LOC"]),  # PER span cut short
             (["O", "B-LOC", "I-LOC", "O"], ["O", "B-LOC", "I-LOC", "O"])]  # all right
# Entities: gold {PER 0-1, LOC 3, LOC 1-2}, predicted {PER 0, LOC 3, LOC 1-2}: 2 of 3 right each way.
ENTITY_F1 = 2 * 2 / (3 + 3)
# Per tag over the 8 tokens: O 6/7, B-PER 1, I-PER 0, B-LOC 1, I-LOC 1.
TOKEN_MACRO_F1 = (6 / 7 + 1 + 0 + 1 + 1) / 5


def _ner_set(sentences=SENTENCES, tags=TAGS):
    import torch

    from kubetune.trainer.batching import Collator, EncodedDataset

    # input id = predicted tag id + 1 (0 pads); a trailing special token is labelled -100.
    features = [{"input_ids": [tags.index(p) + 1 for p in pred] + [1],
                 "labels": [tags.index(g) for g in gold] + [-100]} for gold, pred in sentences]
    dataset = EncodedDataset(features, [{"_task": "ner"}] * len(features))

    def engine(input_ids, **_):
        return SimpleNamespace(logits=torch.nn.functional.one_hot((input_ids - 1).clamp(min=0), len(tags)).float() * 10)

    engine.module = torch.nn.Linear(1, 1)
    return engine, dataset, Collator(0)


def _evaluate_ner(rank: int = 0, world_size: int = 1, sentences=SENTENCES, tags=TAGS):
    from kubetune.trainer.evaluating import evaluate

    engine, dataset, collate = _ner_set(sentences, tags)
    return evaluate(engine, dataset, collate, head="token-classification", micro_batch_size=1, rank=rank,
                    world_size=world_size, device="cpu", labels=tags)


def test_entity_f1_is_seqevals_and_not_token_level():
    from seqeval.metrics import f1_score

    metrics = _evaluate_ner()
    assert f1_score([g for g, _ in SENTENCES], [p for _, p in SENTENCES]) == pytest.approx(ENTITY_F1)
    assert metrics["eval_f1"] == pytest.approx(ENTITY_F1)
    assert abs(metrics["eval_f1"] - TOKEN_MACRO_F1) > 0.1
    assert metrics["eval_accuracy"] == pytest.approx(7 / 8)  # the -100 token is not counted


def test_plain_tags_are_read_as_io_spans():
    # "PER PER" is one entity (IO tagging); a half-found span is wrong as a whole.
    sentences = [(["PER", "PER", "O", "LOC"], ["PER", "O", "O", "LOC"])]
    metrics = _evaluate_ner(sentences=sentences, tags=["O", "PER", "LOC"])
    assert metrics["eval_f1"] == pytest.approx(2 * 1 / (2 + 2))


def _rank_main(rank: int, port: int, out: str) -> None:
    import json

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = _evaluate_ner(rank=rank, world_size=2)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{out}.{rank}", "w") as handle:
        json.dump(metrics, handle)


@pytest.mark.slow
def test_two_ranks_sync_to_the_whole_set(tmp_path):
    """Each rank sees one sentence; torchmetrics sums the entity counts, so both report 2/3."""
    import json

    import torch.multiprocessing

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(port, str(tmp_path / "metrics")), nprocs=2, join=True)
    for rank in (0, 1):
        metrics = json.loads((tmp_path / f"metrics.{rank}").read_text())
        assert metrics["eval_f1"] == pytest.approx(ENTITY_F1), rank
        assert metrics["eval_accuracy"] == pytest.approx(7 / 8), rank
