"""Creating what a FineTuneJob needs: validate fully, plan with the builders, apply idempotently.

Called by the create and resume handlers (``kubetune.operator.handlers``). Nothing is created
before the whole manifest validates (``kubetune.api.parse_job``), so a bad spec never leaves
half-made objects: it gets a SpecRejected condition, phase Failed, a Warning Event and a
``kopf.PermanentError``. Names are deterministic, so running this twice (a retry, an operator
restart between two creates) finds the objects of the first run instead of making more; an object
of the same name still owned by an earlier, deleted namesake makes it wait for the garbage
collector (``kopf.TemporaryError``). A finished job's children are not re-made, so a Job removed by
``ttlSecondsAfterFinished`` does not train again when the operator restarts.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.api import ConditionType, FineTuneJob, Reason, SpecError, parse_job
from kubetune.api.statuses import status_fields
from kubetune.operator import building, indexing, kubeapi, naming, statusing
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
    job = await parse_or_reject(body, fail=True)
    if statusing.is_finished(body):
        return {"children": "kept: the job has finished"}
    # kopf may hand us a body that is already gone (a retry racing a delete): children made now
    # would belong to a dead owner, so look again first.
    live = await kubeapi.get("FineTuneJob", job.namespace, job.name)
    if live is None or live["metadata"].get("deletionTimestamp") or live["metadata"].get("uid") != job.metadata.uid:
        return {"children": "none: the FineTuneJob is gone"}
    options = building.BuildOptions.from_settings(settings)
    made: list[str] = []
    planned = building.plan(job, options)
    new_job: dict[str, Any] | None = None
    for wanted in planned:
        existing, created = await kubeapi.create(wanted)
        kind, name = wanted["kind"], wanted["metadata"]["name"]
        if created:
            made.append(f"{kind}/{name}")
            if kind == "Job":
                new_job = existing
            continue
        stale = _foreign_owner(existing, wanted)
        if stale:
            raise kopf.TemporaryError(
                f"{kind} {name} still belongs to an earlier FineTuneJob of this name (uid {stale}); "
                "waiting for the garbage collector to remove it", delay=settings.retry_delay)
        if kind == "PersistentVolumeClaim":
            await _note_reused_claim(job, existing)
    if made:
        logger.info("created %s", ", ".join(made))
    await statusing.update_conditions(
        job.namespace, job.name,
        [(ConditionType.CREATED, "True", Reason.RESOURCES_CREATED,
          f"created the trainer Job {naming.names_for(job.name).job} and its ConfigMap, Service, claim and RBAC")],
        extra=status_fields(techniques=building.techniques_summary(job), observed_generation=job.metadata.generation),
        defaults=status_fields(phase="Pending", message="resources created"),
        current=live, job=new_job,
    )
    # The Job may have moved on meanwhile (a resume; its events while this ran found no Created yet):
    # from the indexes this costs no request when it has not.
    await statusing.refresh(job.namespace, job.name, seen)
    return {"children": len(planned), "created": len(made)}


async def _note_reused_claim(job: FineTuneJob, claim: dict[str, Any]) -> None:
    made_by = (claim["metadata"].get("annotations") or {}).get(naming.ANNOTATION_JOB_UID)
    if made_by and job.metadata.uid and made_by != job.metadata.uid:
        await kubeapi.post_event(
            statusing.involved(job), reason="ClaimReused",
            message=(f"reusing claim {claim['metadata']['name']} kept from an earlier FineTuneJob of this name; "
                     "its checkpoints and output are still there (checkpointing.resume decides whether training "
                     "continues from them)"),
        )
