"""A FineTuneJob's children deleted under it, by hand or by a cleanup script.

A finished run — Succeeded or Failed — is never run again, whichever child goes (its Job, its
pods, its ConfigMap), with the operator running and after it restarts: no new Job, and the status
stays exactly as it was (Kubeflow Trainer users report the opposite: kubeflow/trainer #2981,
#3737, #3779). A run that has not finished gets its Job back, from the same spec and on the same
workspace claim, so the trainer in the new pod resumes from the checkpoints there (shown with real
training in ``tests/e2e/test_training_flows.py``); never while a pod of the old Job still runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from kubetune.api import ConditionType, Reason
from kubetune.operator import naming
from tests.operator.operating import JobController, condition, events, manifest, status, wait_phase
from tests.support.clusters import Cluster

Operator = Callable[..., Any]

FINISHED = {
    "Succeeded": {"active": 0, "ready": 0, "succeeded": 1, "completionTime": "2026-01-01T00:10:00Z",
                  "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:10:00Z"}]},
    "Failed": {"active": 0, "ready": 0, "failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastTransitionTime": "2026-01-01T00:10:00Z",
         "message": "Job has reached the specified backoff limit"}]},
}
POD_END = {
    "Succeeded": {"phase": "Succeeded", "containerStatuses": [{
        "name": "trainer", "restartCount": 0, "ready": False, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]},
    "Failed": {"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "restartCount": 0, "ready": False, "image": "x", "imageID": "",
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "loss is nan at step 7"}}}]},
}
SELECTOR = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"


def _jobs(cluster: Cluster) -> list[str]:
    return sorted(j["metadata"]["name"] for j in cluster.list("batch/v1", "Job", label_selector=SELECTOR))


def _settle(cluster: Cluster, marker: str) -> None:
    """Let the operator handle what is queued: a new FineTuneJob is served (its Job made) after the
    events before it were seen; a second more covers handlers still running for them."""
    cluster.create(manifest(marker))
    cluster.wait_for(lambda: cluster.find("batch/v1", "Job", marker), timeout=30, what=f"the Job of {marker}")
    time.sleep(1.0)


def _run(cluster: Cluster, job_controller: JobController, name: str) -> dict[str, Any]:
    cluster.create(manifest(name, checkpointing={"everySteps": 10}))
    cluster.wait_for(lambda: condition(cluster, name, ConditionType.CREATED), what=f"{name} created")
    job_controller.add_pod(name, 0, {"phase": "Running", "containerStatuses": [{
        "name": "trainer", "restartCount": 0, "ready": True, "image": "x", "imageID": "", "state": {"running": {}}}]})
    job_controller.set_status(name, {"active": 1, "ready": 1, "startTime": "2026-01-01T00:00:00Z"})
    wait_phase(cluster, name, "Running")
    return cluster.get("batch/v1", "Job", name)


@pytest.mark.slow
@pytest.mark.parametrize("child", ["Job", "Pod", "ConfigMap"])
@pytest.mark.parametrize("outcome", ["Succeeded", "Failed"])
def test_a_finished_run_is_never_run_again_when_a_child_is_deleted(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController, outcome: str, child: str) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        job = _run(cluster, job_controller, "done")
        [pod] = cluster.list("v1", "Pod", label_selector=SELECTOR)
        cluster.patch("v1", "Pod", pod["metadata"]["name"], {"status": POD_END[outcome]}, subresource="status")
        job_controller.set_status("done", FINISHED[outcome])
        wait_phase(cluster, "done", outcome)
        _settle(cluster, "marker-1")  # the status is final: every event of the finish has been handled
        final = status(cluster, "done")
        seen = len(events(cluster, "done"))
        if child == "Job":
            cluster.delete("batch/v1", "Job", "done", propagation_policy="Background")  # its pods go too
            cluster.wait_gone("batch/v1", "Job", "done")
        elif child == "Pod":
            cluster.delete("v1", "Pod", pod["metadata"]["name"])
            cluster.wait_gone("v1", "Pod", pod["metadata"]["name"])
        else:
            cluster.delete("v1", "ConfigMap", naming.names_for("done").config_map)
        _settle(cluster, "marker-2")
        assert status(cluster, "done") == final
    with operator_process(cluster.namespace):  # a restart resumes every FineTuneJob: still nothing
        _settle(cluster, "marker-3")
    assert status(cluster, "done") == final, "the finished status changed"
    assert len(events(cluster, "done")) == seen, events(cluster, "done")[seen:]
    left = cluster.find("batch/v1", "Job", "done")
    if child == "Job":
        assert left is None, "a finished run got a new Job: it would train again"
    else:
        assert left is not None and left["metadata"]["uid"] == job["metadata"]["uid"]
    if child == "ConfigMap":
        assert cluster.find("v1", "ConfigMap", naming.names_for("done").config_map) is None
    assert _jobs(cluster) == sorted(["done", "marker-1", "marker-2", "marker-3"][(child == "Job"):])


@pytest.mark.slow
def test_a_running_job_whose_job_is_deleted_gets_it_back_from_the_same_spec(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        old = _run(cluster, job_controller, "live")
        claim = cluster.get("v1", "PersistentVolumeClaim", naming.names_for("live").claim)
        # kubectl's default: the Job's pods go with it (the kubelet would SIGTERM the trainer, which checkpoints)
        cluster.delete("batch/v1", "Job", "live", propagation_policy="Background")
        new = cluster.wait_for(lambda: (j := cluster.find("batch/v1", "Job", "live")) and
                               j["metadata"]["uid"] != old["metadata"]["uid"] and j, timeout=30, what="a new Job")
        assert new["spec"] == old["spec"]  # the same pods: same command, config, env, workspace claim
        volumes = {v["name"]: v for v in new["spec"]["template"]["spec"]["volumes"]}
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert cluster.get("v1", "PersistentVolumeClaim", claim["metadata"]["name"])["metadata"]["uid"] == \
            claim["metadata"]["uid"]  # the checkpoints' claim is the very same one
        recreated = cluster.wait_for(lambda: [(t, m) for t, r, m in events(cluster, "live") if r == Reason.JOB_RECREATED],
                                     what="the JobRecreated Event")
        assert recreated[0][0] == "Warning" and "resumes from the latest checkpoint" in recreated[0][1]
        _settle(cluster, "marker")
        assert _jobs(cluster) == ["live", "marker"]  # exactly one Job: made once, not once per event
        assert len(recreated) == len([r for _, r, _ in events(cluster, "live") if r == Reason.JOB_RECREATED]) == 1
        assert status(cluster, "live")["phase"] not in ("Succeeded", "Failed")


@pytest.mark.slow
def test_a_deleted_jobs_running_pod_is_waited_for_before_the_job_is_made_again(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    """Deleted with propagation Orphan, the old Job's pod keeps running: a second Job now would put
    two trainers on one checkpoint folder. The Job comes back once that pod has stopped."""
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        old = _run(cluster, job_controller, "orphaned")
        [pod] = cluster.list("v1", "Pod", label_selector=SELECTOR)
        cluster.delete("batch/v1", "Job", "orphaned", propagation_policy="Orphan")
        cluster.wait_gone("batch/v1", "Job", "orphaned")
        _settle(cluster, "marker")
        assert cluster.find("batch/v1", "Job", "orphaned") is None, "a second trainer would run beside the first"
        cluster.patch("v1", "Pod", pod["metadata"]["name"], {"status": {"phase": "Failed", "containerStatuses": [{
            "name": "trainer", "restartCount": 0, "ready": False, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]}}, subresource="status")
        new = cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "orphaned"), timeout=30, what="the Job back")
        assert new["metadata"]["uid"] != old["metadata"]["uid"] and new["spec"] == old["spec"]


@pytest.mark.slow
def test_a_job_deleted_while_the_operator_is_down_comes_back_at_restart_unless_finished(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        _run(cluster, job_controller, "running")
        _run(cluster, job_controller, "finished")
        job_controller.set_status("finished", FINISHED["Succeeded"])
        wait_phase(cluster, "finished", "Succeeded")
    for name in ("running", "finished"):
        cluster.delete("batch/v1", "Job", name, propagation_policy="Background")
        cluster.wait_gone("batch/v1", "Job", name)
    with operator_process(cluster.namespace):
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "running"), timeout=30, what="the running one's Job back")
        _settle(cluster, "marker")
    assert cluster.find("batch/v1", "Job", "finished") is None
    assert status(cluster, "finished")["phase"] == "Succeeded"


def test_a_running_jobs_config_and_rbac_deleted_by_someone_come_back_at_the_next_start_the_job_untouched(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    """The operator does not watch ConfigMaps or RBAC objects (no watch per kind for what only a
    person deletes): what was deleted while the job runs is made again, from the same spec, when the
    operator starts, with the running Job and its claim untouched and no crash in between."""
    cluster = emulated_cluster
    names = naming.names_for("bare")
    kinds = [("v1", "ConfigMap", names.config_map), ("v1", "ServiceAccount", names.service_account),
             ("rbac.authorization.k8s.io/v1", "Role", names.role),
             ("rbac.authorization.k8s.io/v1", "RoleBinding", names.role_binding)]
    with operator_process(cluster.namespace):
        job = _run(cluster, job_controller, "bare")
        claim = cluster.get("v1", "PersistentVolumeClaim", names.claim)
        before = {kind: cluster.get(api, kind, name) for api, kind, name in kinds}
        for api, kind, name in kinds:
            cluster.delete(api, kind, name)
        _settle(cluster, "marker-1")
        assert status(cluster, "bare")["phase"] == "Running"
    with operator_process(cluster.namespace):
        _settle(cluster, "marker-2")
        for api, kind, name in kinds:
            again = cluster.get(api, kind, name)
            assert again["metadata"]["uid"] != before[kind]["metadata"]["uid"], kind
            assert [r["uid"] for r in again["metadata"]["ownerReferences"]] == \
                [r["uid"] for r in before[kind]["metadata"]["ownerReferences"]], kind
            for field in ("data", "rules", "roleRef", "subjects"):
                assert again.get(field) == before[kind].get(field), (kind, field)
        assert cluster.get("batch/v1", "Job", "bare")["metadata"]["uid"] == job["metadata"]["uid"]
        assert cluster.get("v1", "PersistentVolumeClaim", names.claim)["metadata"]["uid"] == claim["metadata"]["uid"]
        assert status(cluster, "bare")["phase"] == "Running"
    assert _jobs(cluster) == ["bare", "marker-1", "marker-2"]
