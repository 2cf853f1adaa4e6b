"""Spec changes of a live FineTuneJob: refuse the immutable ones, apply runPolicy to the Job.

Called by the update handler (``kubetune.operator.handlers``) when ``spec`` changes. What was
actually created is the reference: the spec stored in the job's ConfigMap (the trainer's config).
A change to a training-defining block (``IMMUTABLE_SPEC_FIELDS``; the CRD's CEL rules already
refuse it on a real API server) gets a SpecRejected condition and a Warning Event, and the job
keeps running as created; changing it back clears the condition. ``runPolicy`` changes go onto the
live Job: suspend/resume (``spec.suspend``, unless Kueue manages the Job — then admission and
eviction are Kueue's and the operator never fights it over ``spec.suspend``), backoffLimit,
activeDeadlineSeconds and ttlSecondsAfterFinished.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubetune.api import KUEUE_QUEUE_LABEL, FineTuneJob, Reason, SpecError, parse_spec
from kubetune.api.crds import IMMUTABLE_SPEC_FIELDS
from kubetune.api.statuses import status_fields
from kubetune.operator import building, creating, kubeapi, naming, statusing

logger = logging.getLogger(__name__)


async def created_spec(job: FineTuneJob) -> dict[str, Any] | None:
    """The spec the job's children were made from (normalised), or None before they exist."""
    config_map = await kubeapi.get("ConfigMap", job.namespace, naming.names_for(job.name).config_map)
    if config_map is None:
        return None
    try:
        stored = json.loads((config_map.get("data") or {})[building.CONFIG_FILE])
        return parse_spec(stored["spec"]).to_manifest()
    except (KeyError, ValueError, SpecError) as exc:
        logger.warning("ConfigMap of %s/%s holds no readable spec: %s", job.namespace, job.name, exc)
        return None


def changed_immutable_fields(created: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"spec.{field}" for field in IMMUTABLE_SPEC_FIELDS if created.get(field) != wanted.get(field)]


async def apply_spec_change(body: dict[str, Any]) -> dict[str, Any]:
    job = await creating.parse_or_reject(body, fail=False)
    created = await created_spec(job)
    if created is not None:
        changed = changed_immutable_fields(created, job.spec.to_manifest())
        if changed:
            message = (f"{', '.join(changed)} changed after creation and cannot change: they define the training. "
                       "The job keeps running with the spec it was created with; create a new FineTuneJob "
                       "instead (only spec.runPolicy and labels may change)")
            await statusing.reject_spec(body, Reason.IMMUTABLE_FIELD_CHANGED, message, fail=False)
        else:
            await statusing.accept_spec(body)
    result = await apply_run_policy(job, body)
    await statusing.update_conditions(job.namespace, job.name, [], extra=status_fields(observed_generation=job.metadata.generation))
    await statusing.refresh(job.namespace, job.name)
    return result


async def apply_run_policy(job: FineTuneJob, body: dict[str, Any]) -> dict[str, Any]:
    """Patch the live Job's runPolicy fields; nothing when it is gone or finished."""
    live = await kubeapi.get("Job", job.namespace, naming.names_for(job.name).job)
    if live is None or statusing.is_finished(body):
        return {"runPolicy": "no live Job"}
    kueue_managed = bool((live["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL))
    patch = building.run_policy_patch(job, kueue_managed=kueue_managed)
    current = live.get("spec") or {}
    changes = {k: v for k, v in patch["spec"].items() if current.get(k) != v}
    if kueue_managed and bool(current.get("suspend")) != job.spec.run_policy.suspend:
        await kubeapi.post_event(
            statusing.involved(body), reason="SuspendManagedByKueue", type="Warning",
            message=(f"Kueue admits and evicts this job (queue {live['metadata']['labels'][KUEUE_QUEUE_LABEL]}); "
                     "the operator leaves spec.suspend of its Job to Kueue: deactivate the Kueue Workload to stop it"),
        )
    if not changes:
        return {"runPolicy": "unchanged"}
    await kubeapi.patch("Job", job.namespace, live["metadata"]["name"], {"spec": changes})
    if "suspend" in changes:
        reason, message = (
            (Reason.SUSPENDED, "suspending: the trainer pods stop after a checkpoint")
            if changes["suspend"]
            else (Reason.RESUMED, "resuming from the latest checkpoint")
        )
        await kubeapi.post_event(statusing.involved(body), reason=reason, message=message)
    return {"runPolicy": sorted(changes)}
