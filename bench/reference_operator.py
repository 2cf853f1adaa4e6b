"""The issue's yardstick: a minimal idiomatic kopf operator for FineTuneJobs, not the product.

Issue 14 measures kubetune against "a minimal idiomatic kopf operator (one create handler making
one Job, one event handler mirroring it into status)". This is that operator, written the way kopf's
documentation shows: the official ``kubernetes`` client, kopf's defaults (its progress annotations,
the Events it posts for handlers), ``kopf.adopt`` for the owner reference. It makes only the Job
(kubetune makes ~7 objects) and knows nothing of training. ``bench/operator_scale.py --reference``
runs it in place of ``kubetune operator`` under the same bench (the same FineTuneJobs, the same
Job controller), so the two can be compared on the same API server in the same session:

    kopf run --standalone --namespace NS --liveness http://127.0.0.1:PORT/healthz bench/reference_operator.py
"""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes

FINETUNEJOBS = ("kubetune.io", "v1alpha1", "finetunejobs")
MANAGED = {"app.kubernetes.io/managed-by": "kubetune-operator"}  # what the bench's Job controller watches


@kopf.on.startup()
def configure(**_: Any) -> None:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


@kopf.on.create(*FINETUNEJOBS)
def create_job(name: str, namespace: str, body: kopf.Body, **_: Any) -> dict[str, str]:
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{name}-train", "labels": dict(MANAGED), "annotations": {"kubetune.io/job-name": name}},
        "spec": {"backoffLimit": 0, "completions": 1, "completionMode": "Indexed", "template": {
            "metadata": {"labels": dict(MANAGED)},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "trainer", "image": "example.test/trainer:bench", "args": ["train", name]}]}}},
    }
    kopf.adopt(job, owner=body)
    kubernetes.client.BatchV1Api().create_namespaced_job(namespace, job)
    return {"job": job["metadata"]["name"]}


def _phase(status: dict[str, Any]) -> str | None:
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conditions.get("SuccessCriteriaMet") == "True" or conditions.get("Complete") == "True":
        return "Succeeded"
    if conditions.get("FailureTarget") == "True" or conditions.get("Failed") == "True":
        return "Failed"
    if status.get("active"):
        return "Running"
    return None


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
def mirror_job(body: kopf.Body, namespace: str, **_: Any) -> None:
    owner = (body.metadata.annotations or {}).get("kubetune.io/job-name")
    phase = _phase(dict(body.status or {}))
    if not owner or not phase:
        return
    try:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
            *FINETUNEJOBS[:2], namespace, FINETUNEJOBS[2], owner, {"status": {"phase": phase}})
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
