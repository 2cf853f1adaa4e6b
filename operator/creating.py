"""Creating what a FineTuneJob needs: validate fully, plan with the builders, apply idempotently.

Called by the create and resume handlers (``kubetune.operator.handlers``). Nothing is created
before the whole manifest validates (``kubetune.api.parse_job``), so a bad spec never leaves
half-made objects: it gets a SpecRejected condition, phase Failed, a Warning Event and a
``kopf.PermanentError``; a spec that stops validating once the children exist (an edit, met again
at the next operator start) gets the condition and Event without phase Failed: the Job runs on as
created. Names are deterministic, so running this twice (a retry, an operator
restart between two creates) finds the objects of the first run instead of making more; an object
of the same name still owned by an earlier, deleted namesake makes it wait for the garbage
collector (``kopf.TemporaryError``); one that is someone else's (no owner reference to the job, no
kubetune labels) is neither overwritten nor used: condition ``Created`` False, reason ``NameTaken``,
one Warning Event, no Job, and the handler retries until the name is free. A create the server
refuses for good (a ResourceQuota's 403, an admission policy's 400/403/422) is reported the same
way (reason ``CreateRefused``; of a 422 only the field paths, as its message echoes the object's
values) and retried every ``retry_delay`` seconds, as one log line instead of a traceback. A finished job's children are not re-made, so a Job removed by
``ttlSecondsAfterFinished`` does not train again when the operator restarts.

:func:`restore_job` is called for a managed Job's deletion and a stopped pod whose Job is not seen
(``handlers.reconcile_children``, from the work queue; kopf's handlers for what kopf lists): the Job of a run that has
not finished, deleted by hand or by a cleanup script, is made again from the same spec (its
workspace claim, and so its checkpoints, outlive it), once the old Job's pods have stopped, so two
trainers never write the same checkpoints (a suspended run's Job is made again suspended, as its
spec says). A finished run's Job is never made again (the bug of kubeflow/trainer #2981, #3737,
#3779). Being called for events, whose errors nobody retries (kopf drops an event handler's; the work
queue tries a key again only after a ``kopf.TemporaryError``), it retries transient API failures
itself (``retrying``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TypeGuard

import kopf

from kubetune.api import ConditionType, FineTuneJob, Reason, SpecError, parse_job
from kubetune.api.statuses import status_fields
from kubetune.operator import building, indexing, kubeapi, naming, retrying, statusing
from kubetune.operator.settings import Settings

logger = logging.getLogger(__name__)


def parse_body(body: dict[str, Any]) -> FineTuneJob:
    """The FineTuneJob of a body from the API server (status and server-set metadata dropped)."""
    meta = body.get("metadata") or {}
    manifest = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "uid", "generation") if meta.get(k) is not None},
        "spec": body.get("spec"),
    }
    return parse_job(manifest)


def problems_message(error: SpecError) -> str:
    return "invalid spec: " + "; ".join(str(p) for p in error.problems)


async def parse_or_reject(body: dict[str, Any], *, fail: bool) -> FineTuneJob:
    try:
        return parse_body(body)
    except SpecError as exc:
        message = problems_message(exc)
        await statusing.reject_spec(body, Reason.INVALID_SPEC, message, fail=fail)
        raise kopf.PermanentError(message) from None


#: Seconds after which the FineTuneJob is read again before its Job is made: its children's
#: creates took that long (retries, a slow server), time enough for someone to delete it.
RECHECK_AFTER = 1.0


def _is_alive(live: dict[str, Any] | None, job: FineTuneJob) -> TypeGuard[dict[str, Any]]:
    """Whether ``live`` (the FineTuneJob as just read) is this job and not being deleted."""
    return bool(live and not live["metadata"].get("deletionTimestamp") and live["metadata"].get("uid") == job.metadata.uid)


def was_created(body: dict[str, Any]) -> bool:
    """Whether the job's children were made (its ``Created`` condition is True)."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == ConditionType.CREATED and c.get("status") == "True" for c in conditions)


def _foreign_owner(existing: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The uid of another owner when ``existing`` belongs to an earlier namesake of the job."""
    wanted_uids = {ref["uid"] for ref in wanted["metadata"].get("ownerReferences") or []}
    if not wanted_uids:
        return None
    for ref in existing["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == wanted["metadata"]["ownerReferences"][0]["kind"] and ref.get("uid") not in wanted_uids:
            return str(ref.get("uid"))
    return None


async def ensure_children(body: dict[str, Any], settings: Settings, seen: indexing.Seen | None = None) -> dict[str, Any]:
    """Create every missing child of the job; returns what kopf stores as the handler's result.

    One status write says it: the ``Created`` condition and the phase the new Job shows
    (Initializing, or Suspended/Pending when it starts suspended). No Event: the condition carries
    what was made; Events are left for what a person acts on (``phases.worth_an_event``)."""
    # A spec that no longer validates after its children were made (an edit; this runs again at
    # every operator start) is refused without failing the job: its Job runs on, as created.
    job = await parse_or_reject(body, fail=not was_created(body))
    if statusing.is_finished(body):
        return {"children": "kept: the job has finished"}
    # kopf may hand us a body that is already gone (a retry racing a delete): children made now
    # would belong to a dead owner, so look again first.
    live, looked = await kubeapi.get("FineTuneJob", job.namespace, job.name), time.monotonic()
    if not _is_alive(live, job):
        return {"children": "none: the FineTuneJob is gone"}
    options = building.BuildOptions.from_settings(settings)
    planned = building.plan(job, options)
    *children, job_manifest = planned
    assert job_manifest["kind"] == "Job", "plan() puts the Job last"
    # The children do not depend on each other (a RoleBinding may name a Role not made yet), so they
    # are made at once; the Job last, once they all exist: its pods name the ServiceAccount, which
    # admission refuses when it is missing, and mount the ConfigMap and claim.
    outcomes = await asyncio.gather(*(kubeapi.create(wanted) for wanted in children), return_exceptions=True)
    for wanted, outcome in zip(children, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            await _raise_refused(job, live, wanted, outcome, settings)
            raise outcome  # a transient failure: the handler runs again and finds what was made (409 → existing)
    made: list[str] = []
    new_job: dict[str, Any] | None = None
    for wanted, outcome in zip(children, outcomes, strict=True):
        assert not isinstance(outcome, BaseException)
        existing, created = outcome
        await _check_made(job, wanted, existing, created, made, settings, live)
    if time.monotonic() - looked > RECHECK_AFTER and not _is_alive(await kubeapi.get("FineTuneJob", job.namespace, job.name), job):
        # deleted while its children were made (slowly: retries); they go with it (owner
        # references), and no trainer Job is made for nobody: its pods would start training
        return {"children": "none: the FineTuneJob was deleted meanwhile"}
    try:
        existing, created = await kubeapi.create(job_manifest)
    except Exception as exc:
        await _raise_refused(job, live, job_manifest, exc, settings)
        raise
    await _check_made(job, job_manifest, existing, created, made, settings, live)
    if created:
        new_job = existing
    if made:
        logger.info("created %s", ", ".join(made))
    message, count = created_message(job, planned), len(planned)
    # What was rendered and what the server answered is not needed any more: in a burst a thousand
    # handlers wait here for their status write, each holding ~40 KB of these (peak RSS).
    del planned, children, job_manifest, outcomes, existing
    await statusing.update_conditions(
        job.namespace, job.name,
        [(ConditionType.CREATED, "True", Reason.RESOURCES_CREATED, message)],
        extra=status_fields(techniques=building.techniques_summary(job), observed_generation=job.metadata.generation),
        defaults=status_fields(phase="Pending", message="resources created"),
        current=live, job=new_job,
    )
    # The Job may have moved on meanwhile (a resume; its events while this ran found no Created yet):
    # from the indexes this costs no request when it has not.
    await statusing.refresh(job.namespace, job.name, seen)
    return {"children": count, "created": len(made)}


def _made_by_us(job: FineTuneJob, existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an object found under a child's name is this job's: owned by it, or made by kubetune
    for a FineTuneJob of this name (a claim kept from an earlier namesake). Anything else is someone
    else's object, which the operator neither overwrites nor uses."""
    meta = existing["metadata"]
    if job.metadata.uid and any(ref.get("uid") == job.metadata.uid for ref in meta.get("ownerReferences") or []):
        return True
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    return (labels.get(naming.LABEL_MANAGED_BY) == wanted["metadata"]["labels"][naming.LABEL_MANAGED_BY]
            and annotations.get(naming.ANNOTATION_JOB) == job.name)


async def _raise_refused(job: FineTuneJob, live: dict[str, Any], wanted: dict[str, Any], exc: BaseException,
                         settings: Settings) -> None:
    """A create the server refused for good (a quota's 403, an admission policy's 400/403/422): say
    which child and why on the job (once, not per retry) and retry later, as one log line with no
    traceback; transient failures and our own bugs are left to the caller."""
    if not isinstance(exc, kubeapi.ApiError) or kubeapi.is_transient(exc) or exc.status in (0, 401, 404):
        return
    kind, name = wanted["kind"], wanted["metadata"]["name"]
    message = (f"the API server refused to create {kind} {name}: {exc}; no trainer Job was made, "
               f"retrying every {settings.retry_delay} s")
    await _report_created_false(job, live, Reason.CREATE_REFUSED, message)
    raise kopf.TemporaryError(message, delay=settings.retry_delay) from None


async def _report_created_false(job: FineTuneJob, live: dict[str, Any], reason: str, message: str) -> None:
    """Condition ``Created`` False and a Warning Event, unless the condition says so already."""
    shown = {c.get("type"): c for c in (live.get("status") or {}).get("conditions") or []}.get(ConditionType.CREATED)
    if not (shown and shown.get("reason") == reason and shown.get("message") == message):
        await statusing.update_conditions(
            job.namespace, job.name, [(ConditionType.CREATED, "False", reason, message)],
            defaults=status_fields(phase="Pending", message=message))
        await kubeapi.post_event(statusing.involved(job), reason=reason, message=message, type="Warning")


async def _report_name_taken(job: FineTuneJob, live: dict[str, Any], kind: str, name: str) -> str:
    """Say (once: not again on each retry) that a child's name is taken by someone else's object."""
    message = (f"{kind} {name} already exists and is not this FineTuneJob's (no owner reference to it, no "
               "kubetune labels): it was left untouched and no trainer Job was made; delete or rename it and "
               "the job goes on")
    await _report_created_false(job, live, Reason.NAME_TAKEN, message)
    return message


async def _check_made(job: FineTuneJob, wanted: dict[str, Any], existing: dict[str, Any], created: bool,
                      made: list[str], settings: Settings, live: dict[str, Any]) -> None:
    """Note a child just made; for one that existed, wait while it belongs to an earlier namesake,
    or to someone else (reported as NameTaken)."""
    kind, name = wanted["kind"], wanted["metadata"]["name"]
    if created:
        made.append(f"{kind}/{name}")
        return
    stale = _foreign_owner(existing, wanted)
    if stale:
        raise kopf.TemporaryError(
            f"{kind} {name} still belongs to an earlier FineTuneJob of this name (uid {stale}); "
            "waiting for the garbage collector to remove it", delay=settings.retry_delay)
    if not _made_by_us(job, existing, wanted):
        message = await _report_name_taken(job, live, kind, name)
        raise kopf.TemporaryError(message, delay=settings.retry_delay)
    if kind == "PersistentVolumeClaim":
        await _note_reused_claim(job, existing)


_CHILD_WORDS = {"ConfigMap": "ConfigMap", "Service": "Service", "PersistentVolumeClaim": "claim"}


def created_message(job: FineTuneJob, planned: list[dict[str, Any]]) -> str:
    """What the ``Created`` condition says was made: the Job and the children its spec asked for."""
    kinds = {obj["kind"] for obj in planned}
    words = [word for kind, word in _CHILD_WORDS.items() if kind in kinds]
    if kinds & {"ServiceAccount", "Role", "RoleBinding"}:
        words.append("RBAC")
    others = ", ".join(words[:-1]) + f" and {words[-1]}" if len(words) > 1 else "".join(words)
    return f"created the trainer Job {naming.names_for(job.name).job}" + (f" and its {others}" if others else "")


async def _note_reused_claim(job: FineTuneJob, claim: dict[str, Any]) -> None:
    made_by = (claim["metadata"].get("annotations") or {}).get(naming.ANNOTATION_JOB_UID)
    if made_by and job.metadata.uid and made_by != job.metadata.uid:
        await kubeapi.post_event(
            statusing.involved(job), reason="ClaimReused",
            message=(f"reusing claim {claim['metadata']['name']} kept from an earlier FineTuneJob of this name; "
                     "its checkpoints and output are still there (checkpointing.resume decides whether training "
                     "continues from them)"),
        )


_STOPPED_POD_PHASES = ("Succeeded", "Failed")


async def restore_job(namespace: str, name: str, settings: Settings) -> bool:
    """Make the Job of FineTuneJob ``name`` again when it is gone and the run has not finished;
    returns whether it did. Level-triggered: decided from what exists now, whatever event led here."""
    return await retrying.until_written(lambda: _restore_once(namespace, name, settings))


async def _restore_once(namespace: str, name: str, settings: Settings) -> bool:
    ftj = await kubeapi.get("FineTuneJob", namespace, name)
    if ftj is None or ftj["metadata"].get("deletionTimestamp") or statusing.is_finished(ftj):
        return False
    if not was_created(ftj):
        return False  # the create handler has not finished (or refused the spec): it makes the Job
    job, _ = await statusing.read_job_and_pods(namespace, ftj)
    if job is not None:
        return False
    selector = ",".join(f"{k}={v}" for k, v in naming.selector_labels(name).items())
    pods = await kubeapi.list_objects("Pod", namespace, label_selector=selector)
    running = [p["metadata"]["name"] for p in pods if (p.get("status") or {}).get("phase") not in _STOPPED_POD_PHASES]
    if running:
        logger.info("Job of %s/%s is gone; waiting for its pods %s to stop before making it again",
                    namespace, name, ", ".join(running))
        return False  # their termination is an event of a managed pod, which brings us back here
    try:
        # No Job runs now: a spec edited into something invalid cannot make one, which fails the job
        # (ensure_children alone would only refuse the edit, as it does while the Job runs).
        await parse_or_reject(ftj, fail=True)
        result = await ensure_children(ftj, settings)
    except kopf.PermanentError:
        return False  # the spec no longer validates: marked rejected, phase Failed
    if not result.get("created"):
        return False  # a concurrent event (the Job's, one of its pods') made it first: one Event, from that one
    await kubeapi.post_event(
        ftj, reason=Reason.JOB_RECREATED, type="Warning",
        message=(f"the trainer Job {naming.names_for(name).job} was deleted before the run finished; made it "
                 "again from the same spec: training resumes from the latest checkpoint on the workspace claim"))
    return True
