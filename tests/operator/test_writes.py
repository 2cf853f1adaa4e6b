"""What one FineTuneJob lifecycle costs the API server in writes (issue 14: at most 12, children included).

The real operator runs against the emulator; the test plays the Job controller and kubelet through
a lifecycle as they write it — pod made, Running (seen before the Job's startTime), then the pod
ends and the Job drops ``ready`` before it counts the success — and counts every write the operator (its gateway and kopf) made,
by verb and resource, from the emulator's request log; and that the operator's Job and pod watches
ask the server for its own objects only (a label selector), not every pod of the namespace.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from kubetune.api import ConditionType
from kubetune.operator import kubeapi, naming
from tests.operator.operating import JobController, condition, manifest, wait_event, wait_phase
from tests.support.clusters import Cluster
from tests.support.emulating import Address

Operator = Callable[..., Any]
WRITES = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def operator_writes(cluster: Cluster) -> Counter[str]:
    """'verb resource[/subresource]' → count, of the operator's writes (its gateway's and kopf's)."""
    counts: Counter[str] = Counter()
    for request in list(cluster.emulator.emulator):  # type: ignore[union-attr]
        address = Address.parse(request.url.path)
        verb = WRITES.get(str(request.method.value).upper())
        if address is None or verb is None or not request.headers.get("User-Agent", "").startswith((kubeapi.USER_AGENT, "kopf")):
            continue
        if address.namespace != cluster.namespace:
            continue
        counts[f"{verb} {address.plural}" + (f"/{address.subresource}" if address.subresource else "")] += 1
    return counts


def watch_selectors(cluster: Cluster) -> dict[str, set[str]]:
    """plural → the labelSelectors of kopf's watch requests of it."""
    found: dict[str, set[str]] = {}
    for request in list(cluster.emulator.emulator):  # type: ignore[union-attr]
        address = Address.parse(request.url.path)
        if (address is not None and str(request.method.value).upper() == "GET" and request.params.get("watch") in ("true", "1")
                and request.headers.get("User-Agent", "").startswith("kopf")):
            found.setdefault(address.plural, set()).add(request.params.get("labelSelector", ""))
    return found


def _terminated(exit_code: int) -> dict[str, Any]:
    return {"phase": "Succeeded", "containerStatuses": [
        {"name": "trainer", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": exit_code, "reason": "Completed"}}}]}


def test_a_lifecycle_costs_three_status_writes_two_events_and_one_create_per_child(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster, name = emulated_cluster, "counted"
    job = naming.names_for(name).job
    with operator_process(cluster.namespace):
        # a pod that is not the operator's, in the watched namespace: the server keeps it from the operator
        cluster.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "someone-elses"},
                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        cluster.create(manifest(name))
        cluster.wait_for(lambda: condition(cluster, name, ConditionType.CREATED))
        job_controller.add_pod(job, 0, {"phase": "Pending"})
        # The pod's Running is seen before the Job controller's startTime (separate watches): Running is
        # written with the pod's start time, and the Job's, coming after, costs no write of its own.
        cluster.patch("v1", "Pod", f"{job}-0-abcde", {"status": {"phase": "Running", "startTime": "2026-01-01T00:00:01Z",
                                                                 "containerStatuses": [
            {"name": "trainer", "ready": True, "restartCount": 0, "state": {"running": {}}}]}}, subresource="status")
        assert wait_phase(cluster, name, "Running")["startTime"] == "2026-01-01T00:00:01Z"
        job_controller.set_status(job, {"startTime": "2026-01-01T00:00:00Z", "active": 1, "ready": 0})
        job_controller.set_status(job, {"ready": 1})
        time.sleep(1.5)  # the operator judges these on its own
        # The pod ends; the Job drops ready before it counts the success (kube-controller-manager's order).
        cluster.patch("v1", "Pod", f"{job}-0-abcde", {"status": _terminated(0)}, subresource="status")
        job_controller.set_status(job, {"ready": 0})
        time.sleep(1.5)  # the operator judges this moment on its own (kopf batches an object's events for 0.1 s)
        job_controller.set_status(job, {"active": 0, "succeeded": 1, "completionTime": "2026-01-01T00:05:00Z",
                                        "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                                                       {"type": "Complete", "status": "True"}]})
        wait_phase(cluster, name, "Succeeded")
        wait_event(cluster, name, "JobSucceeded")
        time.sleep(0.5)  # a late write would come now
        writes = operator_writes(cluster)
    # Created + Initializing in one patch, Running, Succeeded; Events for Running and Succeeded only.
    assert writes["patch finetunejobs/status"] == 3, writes
    assert writes["create events"] == 2, writes
    assert writes["patch finetunejobs"] == 0, writes  # kopf's bookkeeping writes nothing
    children = {key: count for key, count in writes.items() if key.startswith("create ") and key != "create events"}
    assert set(children.values()) == {1}, writes  # one create per child, none repeated
    # docs/operations.md: 6 children for a single-node job (no Service), 11 writes in all
    assert set(children) == {f"create {plural}" for plural in ("serviceaccounts", "roles", "rolebindings", "configmaps",
                                                              "persistentvolumeclaims", "jobs")}, writes
    assert sum(writes.values()) == 11, writes
    # The Job and pod watches are label-selected on the server, not filtered in the operator.
    managed = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"
    selectors = watch_selectors(cluster)
    assert selectors["jobs"] == {managed} and selectors["pods"] == {managed}, selectors
    assert selectors["finetunejobs"] == {""}, selectors
