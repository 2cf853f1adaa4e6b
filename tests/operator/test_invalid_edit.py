"""A running job's spec edited into something invalid: refused by field path, nothing running touched.

The edit gets a SpecRejected condition naming the field; the Job, its ConfigMap and its workspace
claim stay exactly as they were and the phase keeps following the Job — also across an operator
restart, when the resume handler meets the edited spec again (it used to mark the job Failed
there, while its trainer went on, and the Job's success was then never shown).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubetune.api import ConditionType, Reason
from kubetune.operator import naming
from tests.operator.operating import FTJ, JobController, condition, manifest, status, wait_phase
from tests.support.clusters import Cluster

Operator = Callable[..., Any]


def _children(cluster: Cluster, name: str) -> dict[str, tuple[str, Any]]:
    names = naming.names_for(name)
    found = {kind: cluster.get(api, kind, child) for api, kind, child in [
        ("batch/v1", "Job", names.job), ("v1", "ConfigMap", names.config_map),
        ("v1", "PersistentVolumeClaim", names.claim)]}
    return {kind: (obj["metadata"]["uid"], obj.get("spec") or obj.get("data")) for kind, obj in found.items()}


def test_an_invalid_edit_of_a_running_job_is_refused_and_survives_an_operator_restart(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("edited"))
        cluster.wait_for(lambda: condition(cluster, "edited", ConditionType.CREATED), what="edited created")
        job_controller.add_pod("edited", 0, {"phase": "Running"})
        job_controller.set_status("edited", {"active": 1, "ready": 1})
        wait_phase(cluster, "edited", "Running")
        before = _children(cluster, "edited")
        # two nodes need a ReadWriteMany claim: a cross-field rule the CRD schema lets through
        cluster.patch(*FTJ, "edited", {"spec": {"resources": {"nodes": 2}}})
        rejected = cluster.wait_for(
            lambda: (c := condition(cluster, "edited", ConditionType.SPEC_REJECTED)) and c["status"] == "True" and c,
            what="SpecRejected")
        assert rejected["reason"] == Reason.INVALID_SPEC
        assert "spec.checkpointing.storage.accessMode" in rejected["message"], rejected
        time.sleep(1.0)
        assert status(cluster, "edited")["phase"] == "Running"
        assert _children(cluster, "edited") == before
    with operator_process(cluster.namespace):  # a restart: the resume handler reads the edited spec
        cluster.create(manifest("marker"))
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "marker"), timeout=30, what="the marker's Job")
        time.sleep(1.0)
        assert status(cluster, "edited")["phase"] == "Running", status(cluster, "edited")
        assert _children(cluster, "edited") == before
        job_controller.set_status("edited", {"active": 0, "ready": 0, "succeeded": 1,
                                             "conditions": [{"type": "Complete", "status": "True"}]})
        final = wait_phase(cluster, "edited", "Succeeded", timeout=30)
    assert {c["type"]: c["status"] for c in final["conditions"]}[ConditionType.SPEC_REJECTED] == "True"
    assert _children(cluster, "edited") == before


def test_a_job_deleted_after_an_invalid_edit_is_not_made_again_and_the_job_fails_by_field_path(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("orphan"))
        cluster.wait_for(lambda: condition(cluster, "orphan", ConditionType.CREATED), what="orphan created")
        job_controller.set_status("orphan", {"active": 1, "ready": 1})
        wait_phase(cluster, "orphan", "Running")
        old = cluster.get("batch/v1", "Job", "orphan")
        claim = cluster.get("v1", "PersistentVolumeClaim", naming.names_for("orphan").claim)
        cluster.patch(*FTJ, "orphan", {"spec": {"resources": {"nodes": 2}}})
        cluster.wait_for(lambda: (c := condition(cluster, "orphan", ConditionType.SPEC_REJECTED)) and c["status"] == "True",
                         what="SpecRejected")
        cluster.delete("batch/v1", "Job", "orphan", propagation_policy="Background")
        failed = wait_phase(cluster, "orphan", "Failed", timeout=30)
        assert "spec.checkpointing.storage.accessMode" in failed["message"], failed
        time.sleep(1.0)
        assert cluster.find("batch/v1", "Job", "orphan") is None or \
            cluster.get("batch/v1", "Job", "orphan")["metadata"]["uid"] == old["metadata"]["uid"]
    # the checkpoints' claim is kept: nothing of the run's data is deleted
    assert cluster.get("v1", "PersistentVolumeClaim", claim["metadata"]["name"])["metadata"]["uid"] == claim["metadata"]["uid"]
