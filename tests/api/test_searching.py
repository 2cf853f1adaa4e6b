"""Hyperparameter-search samplers (optuna's, asked once per trial over a study rebuilt from the
trials before): grid covers the grid, every sampler is deterministic for a seed and the trials
before (so a restarted operator proposes what it would have), TPE learns from finished trials (it
beats random search on a smooth objective), and the pruners stop a trial worse than the others."""

from __future__ import annotations

import math
import statistics

import pytest

from kubetune.api.searching import PastTrial, apply_trial, grid_points, propose_trial, resolve_search_path, should_prune, trial_count
from kubetune.api.specs import FineTuneJobSpec
from kubetune.techniques.hyperparameter_search import HyperparameterSearchSpec


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


def test_tpe_is_deterministic_for_a_seed_and_the_trials_before() -> None:
    """Past the random start-up trials, TPE's proposal depends on the history (and the seed) only:
    the study rebuilt from the same stored trials proposes the same values, another history others."""
    search = _search("tpe", 12)
    history = []
    for i in range(6):
        values = propose_trial(search, i, history, 5)
        history.append((values, _objective(values)))
    stored = [PastTrial(dict(v), m, "Succeeded") for v, m in history]  # as read back after a restart
    assert propose_trial(search, 6, history, 5) == propose_trial(_search("tpe", 12), 6, stored, 5)
    other = [(v, -m) for v, m in history]
    assert propose_trial(search, 6, history, 5) != propose_trial(search, 6, other, 5)
    assert propose_trial(search, 6, history, 5) != propose_trial(search, 6, history, 6)


def test_running_and_failed_trials_take_their_place_in_the_study() -> None:
    """A trial still running counts (TPE's constant liar), a failed one does not break the study,
    and grid trial i is the i-th point whatever happened to the trials before it."""
    grid = HyperparameterSearchSpec.model_validate({"sampler": "grid", "trials": 6, "metric": "m", "parameters": [
        {"path": "peft.r", "type": "int", "values": [2, 4, 8, 16, 32, 64]}]})
    points = [propose_trial(grid, i, [], 0) for i in range(6)]
    mixed = [PastTrial(points[0], None, "Running"), PastTrial(points[1], None, "Failed"), PastTrial({}, None, "Failed")]
    assert propose_trial(grid, 3, mixed, 0) == points[3]
    tpe = _search("tpe", 8)
    finished = [(propose_trial(tpe, i, [], 1), float(i)) for i in range(3)]
    running = [*[PastTrial(v, m) for v, m in finished], PastTrial(propose_trial(tpe, 3, finished, 1), None, "Running")]
    assert propose_trial(tpe, 4, running, 1) != propose_trial(tpe, 4, [*finished, ({}, None)], 1)


def test_median_pruner_stops_a_trial_worse_than_the_finished_ones_at_the_same_step() -> None:
    search = HyperparameterSearchSpec.model_validate({"sampler": "random", "pruner": "median", "trials": 4, "metric": "eval_loss",
                                                       "parameters": [{"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 1e-2}]})
    done = [PastTrial({"training.learningRate": 1e-3}, 1.0, "Succeeded", {2: 2.0, 4: 1.5, 6: 1.0})]
    assert should_prune(search, done, {"training.learningRate": 1e-5}, {2: 2.5})[0]
    assert not should_prune(search, done, {"training.learningRate": 2e-3}, {2: 1.9})[0]
    assert not should_prune(search, [], {"training.learningRate": 1e-5}, {2: 9.0})[0]  # nothing finished to compare with
    off = search.model_copy(update={"pruner": "none"})
    assert not should_prune(off, done, {"training.learningRate": 1e-5}, {2: 2.5})[0]
    maxed = search.model_copy(update={"mode": "max"})
    assert should_prune(maxed, done, {"training.learningRate": 1e-5}, {2: 1.5})[0]  # lower is worse now


def test_successive_halving_stops_a_trial_not_among_the_best_at_its_rung() -> None:
    """Three trials run as the local search runs them (the pruner asked at each evaluation, its notes
    on the rungs kept with the trial); then a fourth: promoted while it is the best at a rung, stopped
    when it is not."""
    search = HyperparameterSearchSpec.model_validate({"sampler": "random", "pruner": "successive-halving", "trials": 8, "metric": "m",
                                                       "parameters": [{"path": "peft.r", "type": "int", "low": 2, "high": 8}]})
    history: list[PastTrial] = []
    for r, loss in ((2, 1.0), (4, 2.0), (8, 3.0)):
        notes: dict = {}
        curve: dict[int, float] = {}
        for step in (1, 2, 4, 8):
            curve[step] = loss + 1.0 / step
            _, notes = should_prune(search, history, {"peft.r": r}, curve, notes)
        history.append(PastTrial({"peft.r": r}, curve[8], "Succeeded", curve, notes))
    assert "completed_rung_0" in history[1].pruner_state  # rung values the next trials compete with
    assert should_prune(search, history, {"peft.r": 3}, {1: 9.0})[0]
    kept, notes = should_prune(search, history, {"peft.r": 3}, {1: 0.5})
    assert not kept and notes == {"completed_rung_0": 0.5}
    assert should_prune(search, history, {"peft.r": 3}, {1: 0.5, 4: 9.0}, notes)[0]  # the next rung: now the worst


@pytest.mark.slow
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


def test_a_grid_too_big_to_hold_is_refused_by_validation_not_by_the_operator_running_out_of_memory() -> None:
    """optuna's GridSampler lists every point; a grid of 10^9 points is a spec error naming the field."""
    import time

    from kubetune.api import SpecError, parse_job

    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "g"}, "spec": {
        "model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}], "eval": {"holdoutFraction": 0.1}},
        "techniques": {"hyperparameterSearch": {"sampler": "grid", "parameters": [
            {"path": "peft.r", "type": "int", "low": 1, "high": 1e9}]}}}}
    start = time.monotonic()
    with pytest.raises(SpecError) as err:
        parse_job(job)
    assert time.monotonic() - start < 2
    [problem] = err.value.problems
    assert problem.path == "spec.techniques.hyperparameterSearch.parameters" and "1000000000 points, at most 100000" in problem.message
    job["spec"]["techniques"]["hyperparameterSearch"]["parameters"][0]["high"] = 64
    assert trial_count(parse_job(job).spec.techniques.hyperparameter_search) == 8  # trials (8) < 64 points
