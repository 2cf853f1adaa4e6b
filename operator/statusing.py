"""Writing a FineTuneJob's status from what its Job and pods are doing.

Called by the kopf handlers on every event of an owned Job or trainer pod, after creation, after a
runPolicy change and when the operator starts (``kubetune.operator.handlers``): read the
FineTuneJob, its Job and pods through ``kubeapi``, let ``phases`` decide, and merge-patch the
status subresource with the operator's fields only, guarded by ``metadata.resourceVersion`` so a
concurrent write by the trainer (progress, checkpoints) is never lost — on a conflict the status
is read again and recomputed, with backoff, until it is written (``retrying``: kopf drops the errors
of the event handlers that call this, so giving up would leave the phase stale). A transition
posts an Event on the FineTuneJob.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import defaultdict
from typing import Any

from kubetune.api import API_VERSION, KIND, TERMINAL_PHASES, ConditionType, FineTuneJob, Reason
from kubetune.api.statuses import early_stop_condition, status_fields
from kubetune.operator import kubeapi, naming, phases, retrying

logger = logging.getLogger(__name__)

# One lock per FineTuneJob serialises its status writers (Job events, pod events, handlers); per
# event loop, because a lock belongs to the loop it was first used in (tests run several operators).
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, defaultdict[tuple[str, str], asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _lock(namespace: str, name: str) -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    return _locks.setdefault(loop, defaultdict(asyncio.Lock))[(namespace, name)]


def _owned_by(obj: dict[str, Any] | None, uid: str | None) -> bool:
    if obj is None or uid is None:
        return obj is not None
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _spec_flags(ftj: dict[str, Any]) -> tuple[bool, str | None]:
    """(runPolicy.suspend, Kueue queue) straight from the body, valid or not."""
    spec = ftj.get("spec") or {}
    labels = ftj.get("metadata", {}).get("labels") or {}
    from kubetune.api import KUEUE_QUEUE_LABEL

    queue = labels.get(KUEUE_QUEUE_LABEL) or (spec.get("resources") or {}).get("queueName")
    return bool((spec.get("runPolicy") or {}).get("suspend")), queue


async def read_job_and_pods(namespace: str, ftj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The Job made for this FineTuneJob (None if absent or a stale one of an earlier namesake) and its pods."""
    name = ftj["metadata"]["name"]
    uid = ftj["metadata"].get("uid")
    job = await kubeapi.get("Job", namespace, naming.names_for(name).job)
    if not _owned_by(job, uid):
        return None, []
    assert job is not None
    selector = ",".join(f"{k}={v}" for k, v in naming.selector_labels(name).items())
    pods = await kubeapi.list_objects("Pod", namespace, label_selector=selector)
    job_uid = job["metadata"].get("uid")
    pods = [p for p in pods if _owned_by(p, job_uid)]
    return job, pods


async def refresh(namespace: str, name: str, *, deleted_job: dict[str, Any] | None = None) -> str | None:
    """Bring the status of one FineTuneJob in line with its Job; returns the phase written (or kept).
    Retried (``retrying``) until written or the FineTuneJob is gone. ``deleted_job`` is the last
    body of a Job that was just deleted: when no Job is left, its outcome is still written (a Job
    removed right after it finished, before its last status was seen)."""
    async with _lock(namespace, name):
        return await retrying.until_written(lambda: _refresh_once(namespace, name, deleted_job))


async def _refresh_once(namespace: str, name: str, deleted_job: dict[str, Any] | None = None) -> str | None:
    ftj = await kubeapi.get("FineTuneJob", namespace, name)
    if ftj is None or ftj["metadata"].get("deletionTimestamp"):
        return None
    status = ftj.get("status") or {}
    job, pods = await read_job_and_pods(namespace, ftj)
    if job is None and deleted_job is not None and _owned_by(deleted_job, ftj["metadata"].get("uid")):
        job = deleted_job
    user_suspended, queue = _spec_flags(ftj)
    obs = phases.observe(job, pods, user_suspended=user_suspended, queue=queue)
    patch = phases.status_patch(status, obs, generation=ftj["metadata"].get("generation"))
    if not patch:
        return status.get("phase")
    assert obs is not None
    await write_status(ftj, patch)  # a 409 (the trainer or kopf wrote in between): read again
    if phases.transitioned(status, obs) and status.get("phase") not in TERMINAL_PHASES:
        await kubeapi.post_event(
            ftj, reason=obs.reason, message=obs.message,
            type="Warning" if obs.phase == "Failed" else "Normal",
        )
    return obs.phase


async def write_status(ftj: dict[str, Any], patch: dict[str, Any]) -> None:
    """Merge-patch status fields, failing with 409 if the object changed since it was read."""
    meta = ftj["metadata"]
    body = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": patch}
    await kubeapi.patch("FineTuneJob", meta.get("namespace"), meta["name"], body, subresource="status")


async def update_conditions(namespace: str, name: str, changes: list[tuple[str, str, str, str]],
                            extra: dict[str, Any] | None = None,
                            defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Set conditions ``(type, status, reason, message)`` and other operator fields (``extra``
    always, ``defaults`` only where the status has no phase yet), retrying on conflicts."""
    async def attempt() -> dict[str, Any] | None:
        ftj = await kubeapi.get("FineTuneJob", namespace, name)
        if ftj is None:
            return None
        status = ftj.get("status") or {}
        generation = ftj["metadata"].get("generation")
        conditions = status.get("conditions") or []
        timestamp = phases.now()
        for kind, value, reason, message in changes:
            conditions = phases.set_condition(conditions, kind, value, reason, message, generation, timestamp)
        patch: dict[str, Any] = dict(extra or {})
        if defaults and not status.get("phase"):
            patch.update(defaults)
        if conditions != (status.get("conditions") or []):
            patch["conditions"] = conditions
        patch = {k: v for k, v in patch.items() if status.get(k) != v}
        if patch:
            await write_status(ftj, patch)
        return ftj

    async with _lock(namespace, name):
        return await retrying.until_written(attempt)


def involved(job: FineTuneJob | dict[str, Any]) -> dict[str, Any]:
    """A body to hang Events on, from a parsed job or a raw one."""
    if isinstance(job, dict):
        return job
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": job.name, "namespace": job.namespace, "uid": job.metadata.uid}}


async def reject_spec(body: dict[str, Any], reason: str, message: str, *, fail: bool) -> None:
    """Mark the spec as refused: a SpecRejected condition, a Warning Event, and phase Failed when nothing runs."""
    meta = body["metadata"]
    extra = status_fields(phase="Failed", message=message) if fail else None
    await update_conditions(meta.get("namespace") or "default", meta["name"],
                            [(ConditionType.SPEC_REJECTED, "True", reason, message)], extra)
    await kubeapi.post_event(body, reason=reason, message=message, type="Warning")


async def accept_spec(body: dict[str, Any]) -> None:
    """Clear an earlier SpecRejected condition (the spec is acceptable again)."""
    conditions = {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}
    rejected = conditions.get(ConditionType.SPEC_REJECTED)
    if rejected and rejected.get("status") == "True":
        meta = body["metadata"]
        await update_conditions(meta.get("namespace") or "default", meta["name"],
                                [(ConditionType.SPEC_REJECTED, "False", Reason.RESOURCES_CREATED,
                                  "the spec matches what was created")])


def stop_not_shown(body: dict[str, Any]) -> bool:
    """Whether the trainer reported an early stop that no ``EarlyStopped`` condition shows yet."""
    status = body.get("status") or {}
    if early_stop_condition(status.get("progress")) is None:
        return False
    return not any(c.get("type") == ConditionType.EARLY_STOPPED and c.get("status") == "True"
                   for c in status.get("conditions") or [])


def is_finished(body: dict[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") in TERMINAL_PHASES
