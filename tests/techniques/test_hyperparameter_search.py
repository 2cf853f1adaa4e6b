"""Technique 8, hyperparameter tuning, under ``kubetune train``: trials run, the best one is kept.

A grid over the learning rate of a tiny random-init causal LM, {1e-6, 3e-3}: a few steps at 1e-6
leave the model where it started, 3e-3 lowers the held-out loss clearly. The search must pick
3e-3 from the trials' own eval losses, copy that trial's model to the output folder, list both
trials in ``status.json``, and not train again when the command is run a second time. The
cluster side (trials as child FineTuneJobs) is tested in ``tests/operator/test_searching.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import main as kubetune
from tests.support.tiny_models import manifest, tiny_model, write_dataset

RATES = [1e-6, 3e-3]


@pytest.fixture(scope="module")
def search_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    model = tiny_model(root / "model", "llama")
    data = write_dataset(root / "text.jsonl", "text", n=48)
    body = manifest(model, data, "text", name="lr-search", overrides={
        "training.maxSteps": 30,
        "training.microBatchSize": 8,
        "training.logEverySteps": 10,
        "checkpointing.everySteps": 1000,
        "techniques": {"hyperparameterSearch": {
            "sampler": "grid", "metric": "eval_loss", "mode": "min", "maxStepsPerTrial": 12,
            "parameters": [{"path": "training.learningRate", "type": "float", "values": RATES}],
        }},
    })
    path = root / "lr-search.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def _grid_order(path: Path) -> list[float]:
    """The learning rates in the order the search proposes them (its trials 0, 1, …)."""
    from kubetune.api import parse_job
    from kubetune.api.searching import propose_trial, trial_count

    spec = parse_job(yaml.safe_load(path.read_text())).spec
    search = spec.techniques.hyperparameter_search
    assert search is not None
    return [propose_trial(search, i, [], spec.training.seed)["training.learningRate"] for i in range(trial_count(search))]


def _train(path: Path, run_dir: Path) -> int:
    return kubetune(["train", "-f", str(path), "-o", str(run_dir), "--no-progress"])


def _status(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "status.json").read_text())


def test_grid_search_keeps_the_trial_with_the_lowest_eval_loss(search_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert _train(search_file, run_dir) == 0

    status = _status(run_dir)
    assert status["phase"] == "Succeeded"
    trials = {t["index"]: t for t in status["trials"]}
    assert sorted(trials) == [0, 1]
    order = _grid_order(search_file)  # optuna's GridSampler: every point once, shuffled by the seed
    assert sorted(order) == RATES
    assert [float(trials[i]["parameters"]["training.learningRate"]) for i in (0, 1)] == order
    assert all(t["state"] == "Succeeded" and t["metric"] is not None for t in trials.values())
    fast_index = order.index(3e-3)
    slow, fast = trials[1 - fast_index]["metric"], trials[fast_index]["metric"]
    assert fast < slow - 0.5, (slow, fast)  # 3e-3 clearly learns, 1e-6 does not move
    assert status["bestTrial"]["index"] == fast_index and status["bestTrial"]["metric"] == fast

    # Each trial is its own run, capped at maxStepsPerTrial, and the output is the best trial's model.
    trial_dirs = sorted((run_dir / "trials").iterdir())
    assert [d.name for d in trial_dirs] == ["lr-search-trial-000", "lr-search-trial-001"]
    for d in trial_dirs:
        assert json.loads((d / "status.json").read_text())["progress"]["step"] == 12
    output = Path(status["outputPath"])
    assert output == run_dir / "output"
    best_weights = (trial_dirs[fast_index] / "output" / "model.safetensors").read_bytes()
    assert (output / "model.safetensors").read_bytes() == best_weights
    assert best_weights != (trial_dirs[1 - fast_index] / "output" / "model.safetensors").read_bytes()

    # Running the command again finds both trials finished: nothing is trained again.
    stamps = {d.name: (d / "output" / "model.safetensors").stat().st_mtime_ns for d in trial_dirs}
    assert _train(search_file, run_dir) == 0
    assert {d.name: (d / "output" / "model.safetensors").stat().st_mtime_ns for d in trial_dirs} == stamps
    again = _status(run_dir)
    assert again["trials"] == status["trials"] and again["bestTrial"] == status["bestTrial"]


def test_the_trainer_entry_point_refuses_a_search(search_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pods train one trial each; a spec that still holds the search block is a clear error.

    The pods' entry point (``python -m kubetune.trainer`` calls this ``main``) runs in this process:
    a subprocess would only add torch's start-up; tests/trainer/test_entrypoint.py runs it as one."""
    from kubetune.trainer.__main__ import main as trainer_main

    rc = trainer_main(["--config", str(search_file), "--local-mode", "--output-dir", str(tmp_path / "out"), "--run-dir", str(tmp_path)])
    said = capsys.readouterr()
    assert rc == 2, said.out + said.err
    assert "spec.techniques.hyperparameterSearch" in said.out + said.err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_median_pruner_stops_a_trial_worse_than_the_finished_ones(tmp_path: Path) -> None:
    """A grid of a learning rate that learns (3e-3) and one that does not (1e-6), each twice (the
    second axis, logEverySteps, changes nothing in training). The median pruner compares each
    trial's eval loss at every evaluation with the finished trials' at the same step: a 1e-6 trial
    that runs after a 3e-3 trial finished is stopped at its first evaluation (step 2 of 12) and
    counts as Pruned; every other trial runs to the end."""
    model = tiny_model(tmp_path / "model", "llama")
    data = write_dataset(tmp_path / "text.jsonl", "text", n=48)
    body = manifest(model, data, "text", name="pruned", overrides={
        "training.microBatchSize": 8,
        "checkpointing.everySteps": 1000,
        "data.eval.everySteps": 2,
        "techniques": {"hyperparameterSearch": {
            "sampler": "grid", "pruner": "median", "metric": "eval_loss", "mode": "min", "maxStepsPerTrial": 12, "trials": 4,
            "parameters": [{"path": "training.learningRate", "type": "float", "values": RATES},
                           {"path": "training.logEverySteps", "type": "int", "values": [5, 10]}],
        }},
    })
    path = tmp_path / "pruned.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    run_dir = tmp_path / "run"
    assert _train(path, run_dir) == 0

    status = _status(run_dir)
    trials = sorted(status["trials"], key=lambda t: t["index"])
    rates = [float(t["parameters"]["training.learningRate"]) for t in trials]
    expected = ["Pruned" if rate == 1e-6 and 3e-3 in rates[:i] else "Succeeded" for i, rate in enumerate(rates)]
    assert [t["state"] for t in trials] == expected
    assert "Pruned" in expected, rates  # the seed's grid order has a good trial before a bad one
    for t, state in zip(trials, expected):
        checkpoints = sorted(p.name for p in (run_dir / "trials" / f"pruned-trial-00{t['index']}" / "checkpoints").glob("step-*"))
        assert checkpoints[-1] == f"step-{2 if state == 'Pruned' else 12:08d}", (t, checkpoints)  # where training stopped
    assert status["bestTrial"]["state"] == "Succeeded" and float(status["bestTrial"]["parameters"]["training.learningRate"]) == 3e-3

    # Re-running the command continues the same study: nothing is trained again, pruned trials included.
    stamps = sorted(p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*/trial.json"))
    assert _train(path, run_dir) == 0
    assert sorted(p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*/trial.json")) == stamps
    assert _status(run_dir)["trials"] == status["trials"]
