"""The operator's flows, written once and run against the emulator and (``-m k8s --kubeconfig``) a
real cluster: apply → children with owner references → status follows the Job; suspend/resume;
restart without duplicates; delete while the operator is down; Kueue; immutable spec changes.

Nothing here needs a scheduler or a kubelet: on the emulator the test plays the Job controller
(``JobController``); on a real cluster the real Job controller answers (suspension, deadlines),
and pods may stay Pending.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client import ApiException

from kubetune.api import KUEUE_QUEUE_LABEL, ConditionType, Reason
from kubetune.operator import naming
from tests.operator.operating import FTJ, JobController, condition, events, manifest, status, wait_event, wait_phase
from tests.support.clusters import Cluster

CHILDREN = [
    ("v1", "ServiceAccount", "-trainer"),
    ("rbac.authorization.k8s.io/v1", "Role", "-trainer"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "-trainer"),
    ("v1", "ConfigMap", "-config"),
    ("v1", "Service", ""),
    ("batch/v1", "Job", ""),
]


def children(cluster: Cluster, name: str) -> dict[str, dict[str, Any] | None]:
    found = {kind: cluster.find(api, kind, name + suffix) for api, kind, suffix in CHILDREN}
    found["PersistentVolumeClaim"] = cluster.find("v1", "PersistentVolumeClaim", f"{name}-workspace")
    return found


def test_apply_creates_owned_children_and_status_follows_the_job(
        ftj_cluster: Cluster, operator_process: Callable[..., Any], job_controller: JobController) -> None:
    cluster = ftj_cluster
    with operator_process(cluster.namespace):
        ftj = cluster.create(manifest("sft"))
        job = cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "sft"), what="the trainer Job")
        made = children(cluster, "sft")
        assert made.pop("Service") is None  # one node: the processes meet on loopback, no rendezvous Service
        uid = ftj["metadata"]["uid"]
        for kind, obj in made.items():
            assert obj is not None, kind
            refs = obj["metadata"].get("ownerReferences") or []
            if kind == "PersistentVolumeClaim":
                assert refs == []  # trained weights outlive the job
            else:
                assert [(r["kind"], r["uid"], r.get("controller")) for r in refs] == [("FineTuneJob", uid, True)], kind
        assert job["spec"]["completionMode"] == "Indexed"
        created = cluster.wait_for(lambda: condition(cluster, "sft", ConditionType.CREATED), what="Created")
        assert created["status"] == "True" and created["reason"] == Reason.RESOURCES_CREATED
        assert created["message"] == "created the trainer Job sft and its ConfigMap, claim and RBAC"
        assert status(cluster, "sft")["techniques"] == "full"
        assert status(cluster, "sft")["observedGeneration"] == ftj["metadata"]["generation"]
        if job_controller.active:
            job_controller.set_status("sft", {"active": 1, "ready": 1, "startTime": "2026-01-01T00:00:00Z"})
            running = wait_phase(cluster, "sft", "Running")
            assert running["startTime"] == "2026-01-01T00:00:00Z"
            job_controller.set_status("sft", {"active": 0, "ready": 0, "succeeded": 1,
                                              "completionTime": "2026-01-01T01:00:00Z",
                                              "conditions": [{"type": "Complete", "status": "True"}]})
            done = wait_phase(cluster, "sft", "Succeeded")
            assert done["completionTime"] == "2026-01-01T01:00:00Z"
            reasons = [reason for _, reason, _ in events(cluster, "sft")]
            assert Reason.PODS_RUNNING in reasons and Reason.JOB_SUCCEEDED in reasons
        else:
            wait_phase(cluster, "sft", "Initializing", timeout=60)


def test_deadline_fails_the_job_with_its_reason(
        ftj_cluster: Cluster, operator_process: Callable[..., Any], job_controller: JobController) -> None:
    cluster = ftj_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("late", runPolicy={"activeDeadlineSeconds": 1}))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "late"))
        job_controller.set_status("late", {"conditions": [
            {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
             "message": "Job was active longer than specified deadline"}]})
        failed = wait_phase(cluster, "late", "Failed", timeout=60)
        cond = next(c for c in failed["conditions"] if c["type"] == ConditionType.FAILED)
        assert cond["reason"] == Reason.DEADLINE_EXCEEDED and "deadline" in cond["message"]
        wait_event(cluster, "late", Reason.DEADLINE_EXCEEDED, "Warning")


def test_suspend_and_resume(ftj_cluster: Cluster, operator_process: Callable[..., Any], job_controller: JobController) -> None:
    cluster = ftj_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("pausable"))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "pausable"))
        cluster.patch(*FTJ, "pausable", {"spec": {"runPolicy": {"suspend": True}}})
        cluster.wait_for(lambda: cluster.get("batch/v1", "Job", "pausable")["spec"].get("suspend") is True,
                         what="the Job suspended")
        job_controller.suspend("pausable")
        suspended = wait_phase(cluster, "pausable", "Suspended", timeout=60)
        cond = next(c for c in suspended["conditions"] if c["type"] == ConditionType.SUSPENDED)
        assert cond["status"] == "True" and cond["reason"] == Reason.SUSPENDED

        cluster.patch(*FTJ, "pausable", {"spec": {"runPolicy": {"suspend": False}}})
        cluster.wait_for(lambda: cluster.get("batch/v1", "Job", "pausable")["spec"].get("suspend") is False,
                         what="the Job resumed")
        job_controller.resume("pausable")
        cluster.wait_for(lambda: (c := condition(cluster, "pausable", ConditionType.SUSPENDED)) and c["status"] == "False",
                         timeout=60, what="Suspended=False")
        assert status(cluster, "pausable")["phase"] != "Suspended"
        wait_event(cluster, "pausable", Reason.RESUMED)


def test_restart_between_two_creates_makes_no_duplicates(
        ftj_cluster: Cluster, operator_process: Callable[..., Any]) -> None:
    cluster = ftj_cluster
    with operator_process(cluster.namespace):
        two_nodes = {"resources": {"nodes": 2}, "checkpointing": {"storage": {"accessMode": "ReadWriteMany"}}}
        cluster.create(manifest("first", **two_nodes))  # two nodes: a rendezvous Service each
        cluster.wait_for(lambda: condition(cluster, "first", ConditionType.CREATED), what="first created")
    cluster.create(manifest("second", **two_nodes))  # while the operator is down
    with operator_process(cluster.namespace):
        cluster.wait_for(lambda: condition(cluster, "second", ConditionType.CREATED), what="second created")
    selector = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"
    for api, kind in [("batch/v1", "Job"), ("v1", "ConfigMap"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"),
                      ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
                      ("rbac.authorization.k8s.io/v1", "RoleBinding")]:
        names = sorted(o["metadata"]["name"] for o in cluster.list(api, kind, label_selector=selector))
        assert len(names) == 2 and len(set(names)) == 2, (kind, names)


def test_delete_while_the_operator_is_down(ftj_cluster: Cluster, operator_process: Callable[..., Any]) -> None:
    cluster = ftj_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("gone"))
        cluster.create(manifest("kept"))
        cluster.wait_for(lambda: condition(cluster, "gone", ConditionType.CREATED) and
                         condition(cluster, "kept", ConditionType.CREATED), what="both created")
    cluster.delete(*FTJ, "gone")
    cluster.wait_gone(*FTJ, "gone", timeout=30)  # no finalizer holds it while the operator is away
    with operator_process(cluster.namespace):
        cluster.wait_gone("batch/v1", "Job", "gone", timeout=60)
        cluster.wait_gone("v1", "ConfigMap", "gone-config", timeout=60)
        # the operator comes up, serves the job that is left, and does not resurrect the deleted one
        cluster.wait_for(lambda: condition(cluster, "kept", ConditionType.CREATED))
        assert cluster.find("batch/v1", "Job", "kept") is not None
    assert cluster.find("batch/v1", "Job", "gone") is None
    assert cluster.find("v1", "PersistentVolumeClaim", "gone-workspace") is not None  # the weights stay


def test_kueue_label_creates_the_job_suspended_and_the_operator_leaves_suspend_to_kueue(
        ftj_cluster: Cluster, operator_process: Callable[..., Any], job_controller: JobController) -> None:
    cluster = ftj_cluster
    body = manifest("queued")
    body["metadata"]["labels"] = {KUEUE_QUEUE_LABEL: "team-a"}
    with operator_process(cluster.namespace):
        cluster.create(body)
        job = cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "queued"))
        assert job["spec"]["suspend"] is True and job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
        cluster.wait_for(lambda: "waiting for Kueue" in (status(cluster, "queued").get("message") or ""), timeout=60)
        assert status(cluster, "queued")["phase"] == "Pending"
        assert condition(cluster, "queued", ConditionType.SUSPENDED)["reason"] == Reason.QUEUED  # type: ignore[index]
        if job_controller.active:  # Kueue admits it: unsuspends the Job; the operator must not undo that
            cluster.patch("batch/v1", "Job", "queued", {"spec": {"suspend": False}})
            job_controller.set_status("queued", {"active": 1, "ready": 1})
            wait_phase(cluster, "queued", "Running")
            cluster.patch(*FTJ, "queued", {"spec": {"runPolicy": {"backoffLimit": 5}}})
            cluster.wait_for(lambda: cluster.get("batch/v1", "Job", "queued")["spec"]["backoffLimit"] == 5)
            assert cluster.get("batch/v1", "Job", "queued")["spec"]["suspend"] is False
            # docs/kueue.md: runPolicy.suspend on a queued job only earns a Warning Event; Kueue keeps suspend
            cluster.patch(*FTJ, "queued", {"spec": {"runPolicy": {"backoffLimit": 5, "suspend": True}}})
            cluster.wait_for(lambda: ("Warning", "SuspendManagedByKueue") in [(t, r) for t, r, _ in events(cluster, "queued")],
                             what="the SuspendManagedByKueue Event")
            assert cluster.get("batch/v1", "Job", "queued")["spec"]["suspend"] is False


def test_immutable_fields_are_refused_run_policy_is_applied(
        ftj_cluster: Cluster, operator_process: Callable[..., Any]) -> None:
    cluster = ftj_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("fixed"))
        cluster.wait_for(lambda: condition(cluster, "fixed", ConditionType.CREATED))
        try:
            cluster.patch(*FTJ, "fixed", {"spec": {"training": {"maxSteps": 500}}})
        except ApiException as exc:  # a real API server refuses it with the CRD's CEL rule
            assert exc.status == 422 and "immutable" in str(exc.body)
        else:  # the emulator does not run CEL: the operator refuses it
            rejected = cluster.wait_for(lambda: condition(cluster, "fixed", ConditionType.SPEC_REJECTED),
                                        what="SpecRejected")
            assert rejected["status"] == "True" and rejected["reason"] == Reason.IMMUTABLE_FIELD_CHANGED
            assert "spec.training" in rejected["message"]
            assert ("Warning", Reason.IMMUTABLE_FIELD_CHANGED) in [(t, r) for t, r, _ in events(cluster, "fixed")]
            config = cluster.get("v1", "ConfigMap", "fixed-config")["data"]["job.json"]
            assert '"maxSteps": 5' in config  # the job keeps training as created
        cluster.patch(*FTJ, "fixed", {"spec": {"runPolicy": {"backoffLimit": 9, "ttlSecondsAfterFinished": 120}}})
        job = cluster.wait_for(lambda: (j := cluster.get("batch/v1", "Job", "fixed"))["spec"]["backoffLimit"] == 9 and j)
        assert job["spec"]["ttlSecondsAfterFinished"] == 120


@pytest.mark.parametrize("delete_with_job", [False, True])
def test_the_workspace_claim_is_deleted_only_when_asked(
        ftj_cluster: Cluster, operator_process: Callable[..., Any], delete_with_job: bool) -> None:
    cluster = ftj_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("ws", checkpointing={"storage": {"deleteWithJob": delete_with_job}}))
        cluster.wait_for(lambda: condition(cluster, "ws", ConditionType.CREATED))
        cluster.delete(*FTJ, "ws")
        cluster.wait_gone("batch/v1", "Job", "ws", timeout=60)
    if delete_with_job:
        cluster.wait_gone("v1", "PersistentVolumeClaim", "ws-workspace", timeout=60)
    else:
        assert cluster.find("v1", "PersistentVolumeClaim", "ws-workspace") is not None
