"""Hyperparameter-search samplers: grid covers the grid, every sampler is deterministic for a
seed, and TPE learns from finished trials (it beats random search on a smooth objective)."""

from __future__ import annotations

import math
import statistics

from kubetune.api.searching import apply_trial, grid_points, propose_trial, resolve_search_path, trial_count
from kubetune.api.specs import FineTuneJobSpec
from kubetune.api.techniques import HyperparameterSearchSpec


def _search(sampler: str, trials: int = 20) -> HyperparameterSearchSpec:
    return HyperparameterSearchSpec.model_validate(
        {
            "sampler": sampler,
            "trials": trials,
            "metric": "eval_loss",
            "parameters": [
                {"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                {"path": "peft.r", "type": "int", "low": 2, "high": 64},
                {"path": "training.lrScheduler", "type": "categorical", "choices": ["linear", "cosine", "constant"]},
            ],
        }
    )


def _objective(v: dict) -> float:
    # best at lr = 1e-3, r = 16, cosine
    return (math.log10(v["training.learningRate"]) + 3) ** 2 + ((v["peft.r"] - 16) / 16) ** 2 + (0 if v["training.lrScheduler"] == "cosine" else 0.3)


def _best(sampler: str, seed: int, trials: int = 30) -> float:
    search, history = _search(sampler, trials), []
    for i in range(trials):
        values = propose_trial(search, i, history, seed)
        history.append((values, _objective(values)))
    return min(m for _, m in history)


def test_grid_enumerates_every_combination_once() -> None:
    search = HyperparameterSearchSpec.model_validate(
        {"sampler": "grid", "trials": 100, "metric": "m", "parameters": [
            {"path": "training.learningRate", "type": "float", "values": [1e-4, 1e-3]},
            {"path": "training.gradientCheckpointing", "type": "categorical", "choices": ["true", "false"]},
            {"path": "peft.r", "type": "int", "low": 4, "high": 6},
        ]}
    )
    points = grid_points(search.parameters)
    assert len(points) == 2 * 2 * 3 == trial_count(search)
    assert {p["training.gradientCheckpointing"] for p in points} == {True, False}
    proposed = [propose_trial(search, i, [], seed=0) for i in range(trial_count(search))]
    assert sorted(map(str, proposed)) == sorted(map(str, points))


def test_samplers_are_deterministic_for_a_seed_and_vary_across_seeds() -> None:
    for sampler in ("random", "tpe"):
        assert [propose_trial(_search(sampler), i, [], 7) for i in range(3)] == [propose_trial(_search(sampler), i, [], 7) for i in range(3)]
        assert propose_trial(_search(sampler), 0, [], 7) != propose_trial(_search(sampler), 0, [], 8)


def test_values_respect_bounds_and_types() -> None:
    search = _search("random", 50)
    for i in range(50):
        v = propose_trial(search, i, [], 1)
        assert 1e-5 <= v["training.learningRate"] <= 1e-1
        assert isinstance(v["peft.r"], int) and 2 <= v["peft.r"] <= 64
        assert v["training.lrScheduler"] in {"linear", "cosine", "constant"}


def test_tpe_beats_random_search() -> None:
    seeds = range(8)
    tpe = statistics.median(_best("tpe", s) for s in seeds)
    rnd = statistics.median(_best("random", s) for s in seeds)
    assert tpe < rnd, (tpe, rnd)


def test_a_trial_spec_validates_with_its_values() -> None:
    base = {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]}, "peft": {"method": "lora"}}
    values = propose_trial(_search("random"), 0, [], 3)
    spec = FineTuneJobSpec.model_validate(apply_trial(base, values))
    assert spec.peft.r == values["peft.r"] and spec.training.learning_rate == values["training.learningRate"]


def test_search_paths_are_checked() -> None:
    assert resolve_search_path("training.learningRate") is None
    assert "did you mean 'learningRate'" in (resolve_search_path("training.learningrate") or "")
    assert "is a block" in (resolve_search_path("training") or "x.is a block") or resolve_search_path("training")
    assert "not a training hyperparameter" in (resolve_search_path("resources.nodes") or "")


def test_trial_manifest_applies_values_and_drops_the_search() -> None:
    from kubetune.api import parse_job
    from kubetune.api.searching import SEARCH_LABEL, TRIAL_INDEX_LABEL, trial_manifest, trial_name

    parent = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "sweep", "namespace": "ml", "labels": {"team": "a"}},
        "spec": {
            "model": {"source": "hf://o/m"},
            "data": {"datasets": [{"source": "d.jsonl", "format": "text"}], "eval": {"holdoutFraction": 0.1}},
            "peft": {"method": "lora"},
            "techniques": {"hyperparameterSearch": {"trials": 4, "maxStepsPerTrial": 7, "parameters": [
                {"path": "peft.r", "type": "int", "low": 2, "high": 8}]}},
        },
    }
    child = parse_job(trial_manifest(parent, 2, {"peft.r": 4}))
    assert child.name == "sweep-trial-002" and child.namespace == "ml"
    assert child.metadata.labels == {"team": "a", SEARCH_LABEL: "sweep", TRIAL_INDEX_LABEL: "2"}
    assert child.spec.peft.r == 4 and child.spec.training.max_steps == 7
    assert child.spec.techniques.hyperparameter_search is None
    long = trial_name("x" * 80, 12)
    assert len(long) <= 63 and long.endswith("-trial-012") and long != trial_name("x" * 79 + "y", 12)
