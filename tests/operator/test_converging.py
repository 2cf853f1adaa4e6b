"""Status converges however often its writes lose: every status decision is retried, with backoff,
until it is written, re-reading the Job, pods and FineTuneJob each time (level-triggered).

The emulator answers the operator's status writes with 409 Conflict N times in a row — what a
trainer that reports progress faster than the operator writes would cause — right when the Job
sends its last event. Kopf ignores errors of event handlers, so a decision that gives up on the
last event would leave the phase stale for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kmock
import pytest

from kubetune.api import ConditionType, Reason
from kubetune.operator import kubeapi, retrying
from tests.operator.operating import FTJ, JobController, condition, manifest, status, wait_phase
from tests.operator.test_searching import finish_trial, search_job
from tests.support.clusters import Cluster

Operator = Callable[..., Any]
CONFLICTS = 8  # more than any fixed number of attempts a handler might make before giving up


def _operator_status_writes(request: kmock.Request, name: str | None = None) -> bool:
    return (request.subresource == "status" and (name is None or request.name == name) and (request.resource is not None and request.resource.plural == "finetunejobs")
            and str(request.method.value).upper() == "PATCH"
            and request.headers.get("User-Agent", "").startswith(kubeapi.USER_AGENT))


def _conflict(cluster: Cluster, name: str, times: int) -> Any:
    emulator = cluster.emulator.emulator  # type: ignore[union-attr]
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
            "message": "the object has been modified; please apply your changes to the latest version and try again"}
    seen = _operator_status_patches(cluster, name)  # kmock counts a filter's matches from the first request
    return emulator[lambda request: _operator_status_writes(request, name)][seen:seen + times] << 409 << body


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "MAX_DELAY", 0.2)  # the production cap is seconds; the test needs no patience


def _operator_status_patches(cluster: Cluster, name: str) -> int:
    return sum(1 for r in list(cluster.emulator.emulator) if _operator_status_writes(r, name))  # type: ignore[union-attr]


def test_the_jobs_last_event_converges_although_every_status_write_conflicts(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("contested"))
        cluster.wait_for(lambda: condition(cluster, "contested", ConditionType.CREATED))
        job_controller.set_status("contested", {"active": 1, "ready": 1})
        wait_phase(cluster, "contested", "Running")
        before = _operator_status_patches(cluster, "contested")
        _conflict(cluster, "contested", CONFLICTS)
        job_controller.set_status("contested", {"active": 0, "ready": 0, "succeeded": 1,
                                                "conditions": [{"type": "Complete", "status": "True"}]})
        final = wait_phase(cluster, "contested", "Succeeded", timeout=30)
        assert _operator_status_patches(cluster, "contested") - before >= CONFLICTS + 1  # it lost CONFLICTS times, then won
    cond = next(c for c in final["conditions"] if c["type"] == ConditionType.SUCCEEDED)
    assert cond["status"] == "True" and cond["reason"] == Reason.JOB_SUCCEEDED
    assert final["completionTime"]


def test_a_search_parent_converges_although_every_status_write_conflicts(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(search_job("contest", [1e-4]))
        trial = cluster.wait_for(lambda: cluster.find(*FTJ, "contest-trial-000"))
        wait_phase(cluster, "contest", "Running")
        _conflict(cluster, "contest", CONFLICTS)
        # the trial's trainer reports its metric, its Job completes: the trial's last event must carry the parent
        finish_trial(cluster, job_controller, trial["metadata"]["name"], eval_loss=0.5)
        final = wait_phase(cluster, "contest", "Succeeded", timeout=30)
    assert final["bestTrial"]["index"] == 0
    assert status(cluster, "contest")["trials"][0]["state"] == "Succeeded"
