"""Technique 8 in the cluster: a search runs its trials as child FineTuneJobs and keeps the best.

The real operator against the emulator. The test plays the trainer of each trial (it patches the
trial's status with its eval loss and output, as rank 0 would) and the Job controller (it marks
the trial's Job Complete); the operator does the rest: at most ``parallelism`` trials at once,
the next trial proposed when one finishes, the parent's trials/bestTrial/phase, no duplicates
after a restart, a trial whose values break the spec counted as Failed, and pruning: the test
reports evaluations with their step (``progress.evalStep``), the operator records them on the trial
and suspends one the pruner stops — once, and with nothing lost over a restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kubetune.api import ConditionType
from kubetune.api.searching import SEARCH_LABEL, TRIAL_INDEX_LABEL
from kubetune.operator import searching
from tests.operator.operating import FTJ, JobController, condition, events, manifest, status, wait_phase
from tests.support.clusters import Cluster

Operator = Callable[..., Any]
RATES = [1e-4, 3e-4, 1e-3]
LOSSES = {0: 2.0, 1: 1.5, 2: 1.8}  # what each trial's trainer reports: trial 1 is the best


def search_job(name: str, values: list[float], parallelism: int = 2, **search: Any) -> dict[str, Any]:
    return manifest(
        name,
        data={"datasets": [{"source": "data/tiny.jsonl", "format": "text"}], "eval": {"holdoutFraction": 0.2}},
        techniques={"hyperparameterSearch": {
            "sampler": "grid", "parallelism": parallelism, "metric": "eval_loss", "mode": "min", "maxStepsPerTrial": 3,
            "parameters": [{"path": "training.learningRate", "type": "float", "values": values}], **search,
        }},
    )


def grid_order(job: dict[str, Any]) -> list[float]:
    """The learning rates in the order the search proposes them: optuna's GridSampler shuffles the
    grid by the job's seed (the operator and ``kubetune train`` alike)."""
    from kubetune.api import parse_job
    from kubetune.api.searching import propose_trial, trial_count

    spec = parse_job(job).spec
    search = spec.techniques.hyperparameter_search
    assert search is not None
    return [propose_trial(search, i, [], spec.training.seed)["training.learningRate"] for i in range(trial_count(search))]


def trials(cluster: Cluster, parent: str) -> dict[int, dict[str, Any]]:
    found = cluster.list(*FTJ, label_selector=f"{SEARCH_LABEL}={parent}")
    return {int(t["metadata"]["labels"][TRIAL_INDEX_LABEL]): t for t in found}


def finish_trial(cluster: Cluster, jobs: JobController, trial: str, eval_loss: float) -> None:
    """The trainer reports its last evaluation and output, then the Job controller marks the Job Complete."""
    cluster.wait_for(lambda: cluster.find("batch/v1", "Job", trial), what=f"the trainer Job of {trial}")
    cluster.patch(*FTJ, trial, {"status": {
        "progress": {"step": 3, "totalSteps": 3, "percent": 100.0, "evalLoss": eval_loss, "metrics": {"eval_perplexity": 7.0}},
        "outputPath": "/workspace/output"}}, subresource="status")
    jobs.set_status(trial, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})


def test_grid_search_runs_trials_as_children_and_keeps_the_best(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        order = grid_order(search_job("hps", RATES))
        assert sorted(order) == sorted(RATES)
        parent = cluster.create(search_job("hps", RATES))
        cluster.wait_for(lambda: "0/3 trials finished, 2 running" in (status(cluster, "hps").get("message") or ""),
                         what="two trials started")
        first = trials(cluster, "hps")
        assert sorted(first) == [0, 1]  # parallelism 2: the third waits
        for index, trial in first.items():
            assert trial["metadata"]["name"] == f"hps-trial-00{index}"
            assert trial["spec"]["training"]["learningRate"] == order[index]
            assert trial["spec"]["training"]["maxSteps"] == 3
            assert "hyperparameterSearch" not in (trial["spec"].get("techniques") or {})
            assert json.loads(trial["metadata"]["annotations"][searching.PARAMETERS_ANNOTATION]) == {
                "training.learningRate": order[index]}
            owner, = trial["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
                "FineTuneJob", "hps", parent["metadata"]["uid"], True)
            cluster.wait_for(lambda: cluster.find("batch/v1", "Job", trial["metadata"]["name"]),
                             what="each trial trained as an ordinary FineTuneJob")
        assert cluster.find("batch/v1", "Job", "hps") is None  # the search itself runs no trainer
        running = status(cluster, "hps")
        assert running["phase"] == "Running"
        assert [t["index"] for t in running["trials"]] == [0, 1]
        assert {t["state"] for t in running["trials"]} <= {"Pending", "Running"} and "bestTrial" not in running

    # Trial 0 finishes while the operator is down; the restarted one proposes exactly one more.
    finish_trial(cluster, job_controller, "hps-trial-000", LOSSES[0])
    with operator_process(cluster.namespace):
        cluster.wait_for(lambda: 2 in trials(cluster, "hps"), what="the third trial after a restart")
        third = trials(cluster, "hps")
        assert sorted(third) == [0, 1, 2]
        assert third[2]["spec"]["training"]["learningRate"] == order[2]
        assert third[0]["status"]["phase"] == "Succeeded"
        finish_trial(cluster, job_controller, "hps-trial-001", LOSSES[1])
        finish_trial(cluster, job_controller, "hps-trial-002", LOSSES[2])
        done = wait_phase(cluster, "hps", "Succeeded")

    assert sorted(trials(cluster, "hps")) == [0, 1, 2]
    assert [(t["index"], t["state"], t["metric"]) for t in done["trials"]] == [
        (i, "Succeeded", LOSSES[i]) for i in range(3)]
    assert [float(t["parameters"]["training.learningRate"]) for t in done["trials"]] == order
    assert done["bestTrial"]["index"] == 1 and done["bestTrial"]["metric"] == min(LOSSES.values())
    assert done["outputPath"] == "pvc://hps-trial-001-workspace/output"
    assert done["progress"]["step"] == 3 and done["progress"]["totalSteps"] == 3
    assert done["completionTime"] and done["startTime"]
    assert condition(cluster, "hps", ConditionType.SUCCEEDED)["status"] == "True"  # type: ignore[index]
    reasons = [reason for _, reason, _ in events(cluster, "hps")]
    assert reasons.count(searching.TRIAL_CREATED) == 3


def test_a_trial_with_invalid_values_counts_as_failed_and_the_search_goes_on(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    job = search_job("bad-values", [50.0, 1e-3], parallelism=1)  # learningRate must be <= 10
    bad = grid_order(job).index(50.0)
    good = 1 - bad
    with operator_process(cluster.namespace):
        cluster.create(job)
        cluster.wait_for(lambda: good in trials(cluster, "bad-values"), what="the valid trial started")
        finish_trial(cluster, job_controller, f"bad-values-trial-00{good}", 0.9)
        done = wait_phase(cluster, "bad-values", "Succeeded")
        assert sorted(trials(cluster, "bad-values")) == [good]  # the invalid one was never created
        warning = next(m for t, r, m in events(cluster, "bad-values") if r == searching.TRIAL_REJECTED)
        assert "spec.training.learningRate" in warning and "must be <= 10" in warning
    assert [(t["index"], t["state"]) for t in done["trials"]] == sorted([(bad, "Failed"), (good, "Succeeded")])
    assert done["bestTrial"]["index"] == good


def test_when_every_trial_fails_the_search_fails(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(search_job("doomed", [1e-4, 1e-3], pruner="median"))
        cluster.wait_for(lambda: sorted(trials(cluster, "doomed")) == [0, 1])
        for name in ("doomed-trial-000", "doomed-trial-001"):
            cluster.wait_for(lambda: cluster.find("batch/v1", "Job", name))
            job_controller.set_status(name, {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff"}]})
        failed = wait_phase(cluster, "doomed", "Failed")
    assert [t["state"] for t in failed["trials"]] == ["Failed", "Failed"]
    assert "bestTrial" not in failed and "outputPath" not in failed
    assert condition(cluster, "doomed", ConditionType.FAILED)["reason"] == searching.ALL_TRIALS_FAILED  # type: ignore[index]
    assert [r for _, r, _ in events(cluster, "doomed") if r == searching.TRIAL_PRUNED] == []  # no evaluation, no pruning


def evaluate(cluster: Cluster, trial: str, step: int, eval_loss: float) -> None:
    """The trial's trainer reports an evaluation at ``step`` (as rank 0 does: evalStep with the metrics)."""
    cluster.wait_for(lambda: cluster.find("batch/v1", "Job", trial), what=f"the trainer Job of {trial}")
    cluster.patch(*FTJ, trial, {"status": {"progress": {"step": step, "totalSteps": 3, "evalStep": step, "evalLoss": eval_loss}}},
                  subresource="status")


def seen(cluster: Cluster, trial: str) -> searching.Pruning:
    """What the operator recorded of a trial's evaluations (its annotation)."""
    return searching.trial_pruning(cluster.get(*FTJ, trial))


def suspended(cluster: Cluster, trial: str) -> bool:
    return bool(cluster.get(*FTJ, trial)["spec"].get("runPolicy", {}).get("suspend"))


def test_median_pruner_suspends_a_worse_trial_and_keeps_its_state_over_a_restart(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(search_job("pruned", RATES, parallelism=1, pruner="median", trials=3))
        cluster.wait_for(lambda: sorted(trials(cluster, "pruned")) == [0], what="the first trial")
        evaluate(cluster, "pruned-trial-000", 1, 1.0)
        cluster.wait_for(lambda: seen(cluster, "pruned-trial-000").intermediate == {1: 1.0}, what="step 1 recorded")
        evaluate(cluster, "pruned-trial-000", 2, 0.8)
        cluster.wait_for(lambda: seen(cluster, "pruned-trial-000").intermediate == {1: 1.0, 2: 0.8}, what="step 2 recorded")
        assert not suspended(cluster, "pruned-trial-000")  # the first trial has nobody to lose to
        finish_trial(cluster, job_controller, "pruned-trial-000", 0.8)
        cluster.wait_for(lambda: 1 in trials(cluster, "pruned"), what="the second trial")
        # trials: 3, so the median pruner starts judging after one finished trial (optuna: n_startup_trials)
        evaluate(cluster, "pruned-trial-001", 1, 2.0)  # worse than trial 0's median at step 1: pruned
        cluster.wait_for(lambda: suspended(cluster, "pruned-trial-001"), what="the worse trial suspended")
        cluster.wait_for(lambda: 2 in trials(cluster, "pruned"), what="a pruned trial counts as finished: the next starts")
        record = cluster.wait_for(lambda: next((t for t in status(cluster, "pruned").get("trials", [])
                                                if t["index"] == 1 and t["state"] == "Pruned"), None))
        assert (record["metric"], record["prunedAtStep"], record["intermediate"]) == (2.0, 1, {"1": 2.0})
        assert "1 pruned" in status(cluster, "pruned")["message"]
        wait_phase(cluster, "pruned-trial-001", "Suspended")  # honest: stopped, not failed; checkpoints kept

    # Restarted: the values and the verdict are read back from the trials, nothing is asked twice.
    with operator_process(cluster.namespace):
        evaluate(cluster, "pruned-trial-002", 1, 0.9)  # better than the median: goes on
        cluster.wait_for(lambda: seen(cluster, "pruned-trial-002").intermediate == {1: 0.9}, what="trial 2's step 1")
        assert seen(cluster, "pruned-trial-000").intermediate == {1: 1.0, 2: 0.8}
        assert seen(cluster, "pruned-trial-001") == searching.Pruning({1: 2.0}, {}, 1)
        assert not suspended(cluster, "pruned-trial-002")
        finish_trial(cluster, job_controller, "pruned-trial-002", 0.7)
        done = wait_phase(cluster, "pruned", "Succeeded")
    assert [(t["index"], t["state"], t["metric"]) for t in done["trials"]] == [
        (0, "Succeeded", 0.8), (1, "Pruned", 2.0), (2, "Succeeded", 0.7)]
    assert done["trials"][0]["intermediate"] == {"1": 1.0, "2": 0.8}
    assert done["bestTrial"]["index"] == 2
    assert suspended(cluster, "pruned-trial-001")  # a finished search leaves the pruned trial stopped
    pruned = [m for _, r, m in events(cluster, "pruned") if r == searching.TRIAL_PRUNED]
    assert len(pruned) == 1 and "trial 1" in pruned[0] and "median" in pruned[0] and "step 1" in pruned[0]


def test_successive_halving_prunes_a_trial_below_the_rung_it_reached(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    """Successive halving compares a trial at a rung with what the trials before it reached there:
    the pruner's notes on each trial (its rungs) must be kept between events."""
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(search_job("halving", RATES, parallelism=1, pruner="successive-halving"))
        for index, loss in ((0, 1.0), (1, 1.2)):  # trial 0 sets the rung's step; trial 1 reaches rung 0
            name = f"halving-trial-00{index}"
            cluster.wait_for(lambda: index in trials(cluster, "halving"), what=f"trial {index}")
            evaluate(cluster, name, 1, loss)
            cluster.wait_for(lambda: seen(cluster, name).intermediate == {1: loss}, what=f"trial {index}'s step 1")
            assert not suspended(cluster, name)
            finish_trial(cluster, job_controller, name, loss)
        assert seen(cluster, "halving-trial-001").pruner_state == {"completed_rung_0": 1.2}
        cluster.wait_for(lambda: 2 in trials(cluster, "halving"), what="trial 2")
        evaluate(cluster, "halving-trial-002", 1, 1.5)  # below the best quarter of rung 0 (1.2): pruned
        cluster.wait_for(lambda: suspended(cluster, "halving-trial-002"), what="trial 2 pruned")
        done = wait_phase(cluster, "halving", "Succeeded")
    assert [(t["state"], t.get("prunedAtStep")) for t in done["trials"]] == [("Succeeded", None), ("Succeeded", None), ("Pruned", 1)]
    assert done["bestTrial"]["index"] == 0


def test_suspending_a_search_suspends_its_trials_and_starts_none(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster

    def suspend_of(name: str) -> bool:
        return bool(cluster.get(*FTJ, name)["spec"].get("runPolicy", {}).get("suspend"))

    with operator_process(cluster.namespace):
        cluster.create(search_job("paused", RATES, parallelism=1))
        cluster.wait_for(lambda: sorted(trials(cluster, "paused")) == [0], what="the first trial")
        cluster.patch(*FTJ, "paused", {"spec": {"runPolicy": {"suspend": True}}})
        cluster.wait_for(lambda: suspend_of("paused-trial-000"), what="the running trial suspended")
        wait_phase(cluster, "paused", "Suspended")
        # A trial that finishes while the search is suspended starts no next one.
        finish_trial(cluster, job_controller, "paused-trial-000", LOSSES[0])
        cluster.wait_for(lambda: "1/3 trials finished" in (status(cluster, "paused").get("message") or ""))
        assert sorted(trials(cluster, "paused")) == [0]
        assert status(cluster, "paused")["phase"] == "Suspended"
        cluster.patch(*FTJ, "paused", {"spec": {"runPolicy": {"suspend": False}}})
        cluster.wait_for(lambda: 1 in trials(cluster, "paused"), what="the search going on after unsuspend")
        assert not suspend_of("paused-trial-001")
        wait_phase(cluster, "paused", "Running")


def test_render_shows_the_trials_a_search_starts_with() -> None:
    """``kubetune render`` of the example: the first ``parallelism`` trials, no trainer objects."""
    from kubetune.api import load_documents, parse_job
    from kubetune.api.searching import propose_trial
    from kubetune.operator.building import BuildOptions
    from kubetune.operator.rendering import render_job
    from tests.operator.operating import REPO

    path = REPO / "examples" / "hyperparameter-search.yaml"
    job = parse_job(load_documents(path.read_text(), str(path))[0].body)
    docs = [d.body for d in load_documents(render_job(job, BuildOptions()), "rendered")]
    assert [d["kind"] for d in docs] == ["FineTuneJob", "FineTuneJob"]
    assert [d["metadata"]["name"] for d in docs] == ["lr-search-trial-000", "lr-search-trial-001"]
    search = job.spec.techniques.hyperparameter_search
    assert search is not None
    first = [propose_trial(search, i, [], job.spec.training.seed)["training.learningRate"] for i in range(2)]
    assert [d["spec"]["training"]["learningRate"] for d in docs] == first
    assert set(first) < {1e-6, 1e-4, 5e-4}  # two different points of the example's grid
    for doc in docs:
        trial = parse_job(doc)  # each trial is a valid job of its own, without the search
        assert trial.spec.techniques.hyperparameter_search is None and trial.spec.training.max_steps == 15
