"""The real operator against the emulator, where the test plays the Job controller in detail:
pods that fail with OOMKilled or a termination message, pods that cannot start, invalid specs,
the trainer's status fields, ttlSecondsAfterFinished, and the permissions the operator uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetune.api import ConditionType, Reason
from kubetune.operator import kubeapi
from tests.operator.operating import FTJ, JobController, condition, manifest, status, wait_event, wait_phase
from tests.support.clusters import Cluster
from tests.support.emulating import Address

Operator = Callable[..., Any]


def test_oom_killed_pod_fails_the_job_with_its_reason(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("big", resources={"memory": "4Gi"}))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "big"))
        job_controller.add_pod("big", 0, {"phase": "Failed", "containerStatuses": [{
            "name": "trainer", "restartCount": 0, "ready": False, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]})
        job_controller.set_status("big", {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"}]})
        failed = wait_phase(cluster, "big", "Failed")
        cond = next(c for c in failed["conditions"] if c["type"] == ConditionType.FAILED)
        assert cond["reason"] == Reason.OOM_KILLED
        assert "big-0-abcde" in cond["message"] and "OOMKilled" in cond["message"]
        assert failed["restarts"] == 1 and failed["completionTime"]
        wait_event(cluster, "big", Reason.OOM_KILLED, "Warning")


def test_termination_message_reaches_the_status(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("crash"))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "crash"))
        job_controller.add_pod("crash", 0, {"phase": "Failed", "containerStatuses": [{
            "name": "trainer", "restartCount": 0, "ready": False, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": 2, "reason": "Error",
                                     "message": "spec.peft.targetModules: no module of the model matches 'q_proj'"}}}]})
        job_controller.set_status("crash", {"failed": 4, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff limit"}]})
        failed = wait_phase(cluster, "crash", "Failed")
        assert "exited with code 2: spec.peft.targetModules: no module of the model matches 'q_proj'" in failed["message"]
        assert condition(cluster, "crash", ConditionType.FAILED)["reason"] == Reason.BACKOFF_LIMIT_EXCEEDED  # type: ignore[index]


def test_pods_that_cannot_start_are_explained_from_pod_events(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("pulling"))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "pulling"))
        job_controller.set_status("pulling", {"active": 1, "ready": 0})
        job_controller.add_pod("pulling", 0, {"phase": "Pending", "containerStatuses": [{
            "name": "trainer", "restartCount": 0, "ready": False, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image example.test"}}}]})
        cluster.wait_for(lambda: "ImagePullBackOff" in (status(cluster, "pulling").get("message") or ""),
                         what="the pull error in status.message")
        assert status(cluster, "pulling")["phase"] == "Initializing"


def test_invalid_spec_is_rejected_without_creating_anything_and_the_operator_goes_on(
        emulated_cluster: Cluster, operator_process: Operator) -> None:
    cluster = emulated_cluster
    bad = manifest("bad", resources={"nodes": 2})  # 2 nodes need a ReadWriteMany claim (cross-field rule)
    with operator_process(cluster.namespace):
        cluster.create(bad)
        rejected = cluster.wait_for(lambda: condition(cluster, "bad", ConditionType.SPEC_REJECTED), what="SpecRejected")
        assert rejected["reason"] == Reason.INVALID_SPEC
        assert "spec.checkpointing.storage.accessMode" in rejected["message"]
        assert status(cluster, "bad")["phase"] == "Failed"
        cluster.create(manifest("good"))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "good"), what="the next job still served")
    for api, kind, name in [("batch/v1", "Job", "bad"), ("v1", "ConfigMap", "bad-config"), ("v1", "Service", "bad"),
                            ("v1", "PersistentVolumeClaim", "bad-workspace"), ("v1", "ServiceAccount", "bad-trainer")]:
        assert cluster.find(api, kind, name) is None, kind


def test_trainer_status_fields_are_never_overwritten(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    trainer = {"progress": {"step": 40, "totalSteps": 100, "percent": 40.0, "loss": 1.25},
               "checkpoints": [{"step": 40, "path": "/workspace/checkpoints/step-40"}],
               "latestCheckpoint": "/workspace/checkpoints/step-40", "bestCheckpoint": "/workspace/checkpoints/step-40",
               "trials": [{"index": 0, "parameters": {"spec.training.learningRate": "0.001"}, "state": "Running"}]}
    with operator_process(cluster.namespace):
        cluster.create(manifest("reporting"))
        cluster.wait_for(lambda: condition(cluster, "reporting", ConditionType.CREATED))
        cluster.patch(*FTJ, "reporting", {"status": trainer}, subresource="status")
        job_controller.set_status("reporting", {"active": 1, "ready": 1})
        wait_phase(cluster, "reporting", "Running")
        job_controller.set_status("reporting", {"active": 0, "ready": 0, "succeeded": 1,
                                                "conditions": [{"type": "Complete", "status": "True"}]})
        final = wait_phase(cluster, "reporting", "Succeeded")
    for key, value in trainer.items():
        assert final[key] == value, key


def test_an_early_stop_reported_by_the_trainer_shows_as_the_early_stopped_condition(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    why = "eval_loss did not improve by more than 0.01 for 3 evaluations (best 1.9 at step 4)"
    with operator_process(cluster.namespace):
        cluster.create(manifest("plateau", techniques={"earlyStopping": {"patience": 3}},
                                data={"datasets": [{"source": "data/tiny.jsonl", "format": "text"}],
                                      "eval": {"holdoutFraction": 0.2}}))
        cluster.wait_for(lambda: condition(cluster, "plateau", ConditionType.CREATED))
        job_controller.set_status("plateau", {"active": 1, "ready": 1})
        wait_phase(cluster, "plateau", "Running")
        # the trainer's last report (as rank 0 writes it), before its pod ends: no Job event follows yet
        cluster.patch(*FTJ, "plateau", {"status": {"progress": {"step": 10, "totalSteps": 40,
                                                                "stopReason": f"early-stopped: {why}"}}}, subresource="status")
        stopped = cluster.wait_for(lambda: condition(cluster, "plateau", ConditionType.EARLY_STOPPED),
                                   what="the EarlyStopped condition")
        assert (stopped["status"], stopped["reason"]) == ("True", Reason.METRIC_PLATEAU) and why in stopped["message"]
        job_controller.set_status("plateau", {"active": 0, "ready": 0, "succeeded": 1,
                                              "conditions": [{"type": "Complete", "status": "True"}]})
        final = wait_phase(cluster, "plateau", "Succeeded")
    assert {c["type"]: c["status"] for c in final["conditions"]}[ConditionType.EARLY_STOPPED] == "True"
    assert final["progress"]["stopReason"] == f"early-stopped: {why}"  # the trainer's field, untouched


def test_ttl_removes_the_job_but_the_finished_status_stays_and_nothing_retrains(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("short", runPolicy={"ttlSecondsAfterFinished": 0}))
        job = cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "short"))
        assert job["spec"]["ttlSecondsAfterFinished"] == 0
        job_controller.set_status("short", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        wait_phase(cluster, "short", "Succeeded")
        cluster.delete("batch/v1", "Job", "short", propagation_policy="Background")  # the TTL controller's part
        cluster.wait_gone("batch/v1", "Job", "short")
    with operator_process(cluster.namespace):  # a restart must not train it again
        cluster.create(manifest("marker"))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "marker"))
    assert cluster.find("batch/v1", "Job", "short") is None
    assert status(cluster, "short")["phase"] == "Succeeded"
    assert cluster.find("v1", "PersistentVolumeClaim", "short-workspace") is not None


def test_changing_an_immutable_field_back_clears_the_refusal(
        emulated_cluster: Cluster, operator_process: Operator) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("undo"))
        cluster.wait_for(lambda: condition(cluster, "undo", ConditionType.CREATED))
        cluster.patch(*FTJ, "undo", {"spec": {"model": {"source": "hf://other/model"}}})
        cluster.wait_for(lambda: (c := condition(cluster, "undo", ConditionType.SPEC_REJECTED)) and c["status"] == "True")
        cluster.patch(*FTJ, "undo", {"spec": {"model": {"source": "hf://sshleifer/tiny-gpt2"}}})
        cluster.wait_for(lambda: (c := condition(cluster, "undo", ConditionType.SPEC_REJECTED)) and c["status"] == "False",
                         what="SpecRejected cleared")


def _permission(request: Any) -> tuple[str, str, str] | None:
    address = Address.parse(request.url.path)
    if address is None:
        return None  # discovery
    resource = f"{address.plural}/{address.subresource}" if address.subresource else address.plural
    method = str(request.method).upper().rsplit(".", 1)[-1]
    if method == "GET":
        verb = "watch" if request.params.get("watch") in ("true", "1") else ("get" if address.name else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    return address.group, resource, verb


def test_required_permissions_are_exactly_what_the_operator_uses(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    """Every request of the operator (our gateway and kopf) is declared, and every declared
    permission is used by these flows (or granted on to trainers): the chart's ClusterRole is
    tested against the same list."""
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        # two nodes: a job of several nodes is the one that needs the rendezvous Service
        cluster.create(manifest("perm", resources={"nodes": 2}, checkpointing={"storage": {"accessMode": "ReadWriteMany"}}))
        cluster.wait_for(lambda: condition(cluster, "perm", ConditionType.CREATED))
        from tests.operator.test_searching import search_job  # a search creates its trials (FineTuneJobs)

        cluster.create(search_job("perm-search", [1e-4]))
        cluster.wait_for(lambda: cluster.find(*FTJ, "perm-search-trial-000"))
    with operator_process(cluster.namespace):  # a restart re-reads what exists (409, then get)
        job_controller.add_pod("perm", 0, {"phase": "Running"})
        job_controller.set_status("perm", {"active": 1, "ready": 1})
        wait_phase(cluster, "perm", "Running")
        cluster.patch(*FTJ, "perm", {"spec": {"runPolicy": {"suspend": True}}})
        cluster.wait_for(lambda: cluster.get("batch/v1", "Job", "perm")["spec"]["suspend"] is True)
        # A search passes suspend on to its trials (a patch of FineTuneJobs: kopf itself no longer
        # patches them in a normal lifecycle, its retry records aside).
        cluster.patch(*FTJ, "perm-search", {"spec": {"runPolicy": {"suspend": True}}})
        cluster.wait_for(lambda: (cluster.get(*FTJ, "perm-search-trial-000")["spec"].get("runPolicy") or {}).get("suspend") is True)
    used: set[tuple[str, str, str]] = set()
    for request in list(cluster.emulator.emulator):  # type: ignore[union-attr]
        agent = request.headers.get("User-Agent", "")
        if agent.startswith(kubeapi.USER_AGENT) or agent.startswith("kopf"):
            found = _permission(request)
            if found:
                used.add(found)
    declared = {(g, r, v) for g, r, verbs in kubeapi.REQUIRED_PERMISSIONS for v in verbs}
    assert used - declared == set(), "requests the chart's RBAC would refuse"
    delegated = {(g, r, v) for g, r, verbs in kubeapi.GRANTED_TO_TRAINERS for v in verbs}
    assert declared - used - delegated == set(), "declared permissions no flow uses"


def test_the_trainer_role_grants_nothing_the_operator_does_not_hold() -> None:
    from kubetune.operator import building
    from tests.operator.test_building import job_of

    role = building.build_role(job_of())
    assert role is not None
    held = {(g, r, v) for g, r, verbs in kubeapi.REQUIRED_PERMISSIONS for v in verbs}
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted <= held
    assert granted == {(g, r, v) for g, r, verbs in kubeapi.GRANTED_TO_TRAINERS for v in verbs}
