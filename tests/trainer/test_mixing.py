"""Mixing weights of several datasets take effect without any technique turned on."""

from __future__ import annotations

from collections import Counter

from kubetune.api import parse_spec
from kubetune.trainer.batching import weighted_dataset_order


def _spec(weights: list[float]) -> object:
    return parse_spec(
        {
            "model": {"source": "hf://o/m"},
            "data": {"datasets": [{"name": f"d{i}", "source": f"d{i}.jsonl", "format": "text", "weight": w} for i, w in enumerate(weights)]},
        }
    )


def test_unequal_weights_set_the_mix_of_each_epoch() -> None:
    examples = [{"_dataset": "d0"}] * 500 + [{"_dataset": "d1"}] * 500
    order = weighted_dataset_order(_spec([3.0, 1.0]), examples, epoch=0)
    assert order is not None and len(order) == len(examples)
    share = Counter(examples[i]["_dataset"] for i in order)["d0"] / len(order)
    assert abs(share - 0.75) < 0.04
    assert order != weighted_dataset_order(_spec([3.0, 1.0]), examples, epoch=1)
    assert order == weighted_dataset_order(_spec([3.0, 1.0]), examples, epoch=0)


def test_a_small_dataset_with_a_large_weight_repeats_instead_of_running_dry() -> None:
    examples = [{"_dataset": "d0"}] * 900 + [{"_dataset": "d1"}] * 100
    order = weighted_dataset_order(_spec([1.0, 1.0 + 1e-9 + 1.0]), examples, epoch=0)
    assert order is not None
    picked = Counter(examples[i]["_dataset"] for i in order)
    assert picked["d1"] > 500  # the 100 examples of d1 cycle to reach their two-thirds share


def test_equal_weights_keep_the_plain_order() -> None:
    assert weighted_dataset_order(_spec([1.0, 1.0]), [{"_dataset": "d0"}, {"_dataset": "d1"}], 0) is None
