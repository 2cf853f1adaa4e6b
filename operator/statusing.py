"""Writing a FineTuneJob's status from what its Job and pods are doing.

Called for the events of an owned Job or trainer pod (by the work queue's workers, once for the
events that came meanwhile, ``queueing``; by kopf's handlers for what kopf lists), after creation,
after a runPolicy change and when the operator starts (``kubetune.operator.handlers``): take the
FineTuneJob, its Job and pods from what the watches saw (``indexing``; through ``kubeapi`` where a
caller has no indexes, and on every retry), let ``phases`` decide, and merge-patch the status
subresource with the operator's fields only. A decision from fresh reads is guarded by
``metadata.resourceVersion``; on a conflict the status is read again and recomputed, with backoff,
until it is written (``retrying``: kopf drops the errors of the event handlers that call this, so
giving up would leave the phase stale). A decision from the indexes is written without that
precondition: the operator is the only writer of its fields (phase, message, conditions, times;
the trainer writes progress and checkpoints only, ``trainer/reporting.py``), every writer of one
FineTuneJob holds its lock here, and every write is remembered (:func:`written`) until the index
shows it, so the operator fields a decision starts from are current even when the index trails by
an event; a merge patch leaves the trainer's fields alone. The precondition there would only
collide with kopf's own annotation writes (measured: 2.4 conflicts per lifecycle at N = 50).
A transition a person would act on posts an Event on the FineTuneJob (``phases.worth_an_event``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from kubetune.api import API_VERSION, KIND, TERMINAL_PHASES, ConditionType, FineTuneJob, Reason
from kubetune.api.statuses import early_stop_condition, status_fields, status_key
from kubetune.operator import indexing, kubeapi, naming, phases, retrying

logger = logging.getLogger(__name__)

# One lock per FineTuneJob serialises its status writers (Job events, pod events, handlers); per
# event loop, because a lock belongs to the loop it was first used in (tests run several operators).
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, defaultdict[tuple[str, str], asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


# The FineTuneJobs as this operator's last status write returned them (``indexing.Seen.written``):
# every write goes through write_status and lands here, so a decision from the indexes never misses
# one of our own writes that the watch has not delivered yet. Per event loop, as the locks.
_written: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[indexing.Key, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


# The resourceVersions of this operator's status writes whose watch events have not come back yet
# (``watching`` keeps those events from kopf: :func:`take_echo`). Per event loop, as the locks.
_echoes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[indexing.Key, set[str]]] = (
    weakref.WeakKeyDictionary()
)


def _lock(namespace: str, name: str) -> asyncio.Lock:
    locks: defaultdict[tuple[str, str], asyncio.Lock] = indexing.per_loop(_locks, lambda: defaultdict(asyncio.Lock))
    return locks[(namespace, name)]


def written() -> dict[indexing.Key, dict[str, Any]]:
    """This operator's last status write per FineTuneJob (dropped once the index has caught up)."""
    found: dict[indexing.Key, dict[str, Any]] = indexing.per_loop(_written, dict)
    return found


def take_echo(namespace: str, name: str, resource_version: str) -> bool:
    """Whether this version of the FineTuneJob is one of our own status writes coming back (once
    each). A watch delivers versions in order, so the writes older than this version have come back
    already (or came before their write was recorded, when the event won the race with the
    write's answer): they are forgotten."""
    echoes: dict[indexing.Key, set[str]] = indexing.per_loop(_echoes, dict)
    pending = echoes.get((namespace, name))
    if not pending:
        return False
    ours = resource_version in pending
    current = indexing.resource_version(resource_version)
    pending.difference_update({v for v in pending if indexing.resource_version(v) <= current})
    if not pending:
        del echoes[(namespace, name)]
    return ours


def forget(namespace: str, name: str) -> None:
    """The FineTuneJob is gone: drop what we remember of it (its lock goes with the last waiter)."""
    written().pop((namespace, name), None)
    indexing.per_loop(_echoes, dict).pop((namespace, name), None)
    locks = _locks.get(asyncio.get_running_loop())
    lock = locks.get((namespace, name)) if locks is not None else None
    if lock is not None and not lock.locked():
        del locks[(namespace, name)]  # type: ignore[union-attr]


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


async def refresh(namespace: str, name: str, seen: indexing.Seen | None = None, *,
                  deleted_job: dict[str, Any] | None = None) -> str | None:
    """Bring the status of one FineTuneJob in line with its Job; returns the phase written (or kept).
    The first attempt decides from ``seen`` (the watches' indexes) where given, the others from
    fresh reads; retried (``retrying``) until written or the FineTuneJob is gone. ``deleted_job`` is
    the last body of a Job that was just deleted: when no Job is left, its outcome is still written
    (a Job removed right after it finished, before its last status was seen)."""
    attempts = 0

    async def attempt() -> str | None:
        nonlocal attempts
        attempts += 1
        return await _refresh_once(namespace, name, seen, from_memory=attempts == 1, deleted_job=deleted_job)

    async with _lock(namespace, name):
        return await retrying.until_written(attempt)


async def _refresh_once(namespace: str, name: str, seen: indexing.Seen | None, *, from_memory: bool,
                        deleted_job: dict[str, Any] | None = None) -> str | None:
    ftj = seen.finetunejob(namespace, name) if seen is not None and from_memory else None
    remembered = ftj is not None
    if ftj is None:
        ftj = await kubeapi.get("FineTuneJob", namespace, name)
    if ftj is None or ftj["metadata"].get("deletionTimestamp"):
        return None
    status = ftj.get("status") or {}
    if status.get(status_key("observed_generation")) is None:
        # Creation is not recorded yet: its handler writes the first phase with the Created condition
        # and refreshes after (``creating``); a phase written before would make kopf, which reads
        # observedGeneration as its diff base (``persistence``), take the job for a new one again.
        return None
    if remembered and seen is not None and seen.jobs is not None and seen.pods is not None:
        job, pods = _job_and_pods_seen(seen, namespace, ftj)
    else:
        job, pods = await read_job_and_pods(namespace, ftj)
    if job is None and deleted_job is not None and _owned_by(deleted_job, ftj["metadata"].get("uid")):
        job = deleted_job
    user_suspended, queue = _spec_flags(ftj)
    obs = phases.observe(job, pods, user_suspended=user_suspended, queue=queue)
    patch = phases.status_patch(status, obs, generation=ftj["metadata"].get("generation"))
    if not patch:
        return status.get("phase")
    assert obs is not None
    # From the indexes: no precondition (see the module docstring); from a read: a 409 means read again.
    await write_status(ftj, patch, guarded=not remembered)
    if phases.worth_an_event(status, obs) and status.get("phase") not in TERMINAL_PHASES:
        await kubeapi.post_event(
            ftj, reason=obs.reason, message=obs.message,
            type="Warning" if obs.phase == "Failed" else "Normal",
        )
    return obs.phase


def _job_and_pods_seen(seen: indexing.Seen, namespace: str, ftj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """As :func:`read_job_and_pods`, from the indexes."""
    name = ftj["metadata"]["name"]
    job = seen.job(namespace, name)
    if not _owned_by(job, ftj["metadata"].get("uid")):
        return None, []
    assert job is not None
    job_uid = job["metadata"].get("uid")
    return job, [p for p in seen.pods_of(namespace, name) if _owned_by(p, job_uid)]


async def write_status(ftj: dict[str, Any], patch: dict[str, Any], *, guarded: bool = True) -> dict[str, Any] | None:
    """Merge-patch status fields; ``guarded``, failing with 409 if the object changed since it was
    read. Returns the object as written (None when it is gone) and remembers it (:func:`written`)."""
    meta = ftj["metadata"]
    body: dict[str, Any] = {"status": patch}
    if guarded:
        body["metadata"] = {"resourceVersion": meta.get("resourceVersion")}
    namespace = meta.get("namespace") or "default"
    result = await kubeapi.patch("FineTuneJob", namespace, meta["name"], body, subresource="status")
    if result is not None:
        written()[(namespace, meta["name"])] = indexing.finetunejob_entry(result)
        version = (result.get("metadata") or {}).get("resourceVersion")
        if version:
            echoes: dict[indexing.Key, set[str]] = indexing.per_loop(_echoes, dict)
            echoes.setdefault((namespace, meta["name"]), set()).add(version)
    return result


async def update_conditions(namespace: str, name: str, changes: list[tuple[str, str, str, str]],
                            extra: dict[str, Any] | None = None,
                            defaults: dict[str, Any] | None = None, *,
                            current: dict[str, Any] | None = None,
                            job: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Set conditions ``(type, status, reason, message)`` and other operator fields (``extra``
    always, ``defaults`` only where the status has no phase yet), retrying on conflicts.

    ``current`` is the FineTuneJob as just read (the first attempt starts from it instead of a GET);
    ``job``, a Job just created for it, puts the phase it shows (Initializing, or Suspended/Pending)
    into the same write, so creation and the first phase cost one status patch."""
    first = current

    async def attempt() -> dict[str, Any] | None:
        nonlocal first
        ftj, first = first, None
        if ftj is None:
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
        obs = None
        if job is not None:
            user_suspended, queue = _spec_flags(ftj)
            obs = phases.observe(job, [], user_suspended=user_suspended, queue=queue)
            phase_patch = phases.status_patch({**status, "conditions": conditions}, obs, generation=generation,
                                              timestamp=timestamp)
            conditions = phase_patch.pop("conditions", conditions)
            patch.update(phase_patch)
        elif defaults and not status.get("phase"):
            patch.update(defaults)
        if conditions != (status.get("conditions") or []):
            patch["conditions"] = conditions
        patch = {k: v for k, v in patch.items() if status.get(k) != v}
        if patch:
            await write_status(ftj, patch)
            if obs is not None and phases.worth_an_event(status, obs):
                await kubeapi.post_event(ftj, reason=obs.reason, message=obs.message)
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
    # observedGeneration: this spec was acted on (refused), which is what kopf's diff base reads (``persistence``).
    extra = status_fields(observed_generation=meta.get("generation"),
                          **({"phase": "Failed", "message": message} if fail else {}))
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


def stop_not_shown(body: Mapping[str, Any]) -> bool:
    """Whether the trainer reported an early stop that no ``EarlyStopped`` condition shows yet."""
    status = body.get("status") or {}
    if early_stop_condition(status.get("progress")) is None:
        return False
    return not any(c.get("type") == ConditionType.EARLY_STOPPED and c.get("status") == "True"
                   for c in status.get("conditions") or [])


def is_finished(body: dict[str, Any]) -> bool:
    return (body.get("status") or {}).get("phase") in TERMINAL_PHASES
