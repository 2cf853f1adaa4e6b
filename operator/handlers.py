"""Every kopf handler of the operator, and nothing else: each one delegates in a line or two.

``kubetune operator`` (``kubetune.operator.running``) imports this module; tests load it into a
fresh ``kopf.OperatorRegistry`` with ``kopf.testing.KopfRunner``. What is watched:

* FineTuneJobs: create and resume make the children (``creating``), or — for a technique that
  arranges runs (``arranging``: hyperparameter search) — hand the job to that technique's operator
  hook, which makes its runs; a spec change is checked and its runPolicy applied (``updating``),
  every event updates the jobs-by-phase metric; an early stop the trainer reported
  (``progress.stopReason``) and no condition shows yet is written (``statusing``);
* runs such a hook made (FineTuneJobs carrying its ``CHILD_LABEL``, e.g. ``kubetune.io/search``):
  every event goes back to the hook (the next trials, the parent's trials/bestTrial/phase);
* admission of FineTuneJobs (CREATE, UPDATE): the validating webhook (``admitting``), when
  ``KUBETUNE_WEBHOOK_PORT`` turns kopf's webhook server on;
* batch/v1 Jobs and pods carrying the operator's ``managed-by`` label: every event is noted in
  ``indexing``'s store (as is every FineTuneJob event) and recomputes the owning FineTuneJob's
  status from it (``statusing``), reading nothing from the API; a deleted Job, or the last pod of a
  Job that is gone stopping, makes the Job of an unfinished run again (``creating.restore_job``).
  Their watch events are taken before kopf (``queue_child_event``, through ``watching``): noted in
  stream order, and the FineTuneJob put in a deduplicating work queue (``queueing``) whose workers
  make the decision once for all the events that came meanwhile (``reconcile_children``).
  ``follow_job``/``follow_pod`` do the same per event for what kopf still hands them: its listings
  (at start-up, after a watch expired), and every event where the hook cannot install.
  No timers, no polling loops.

Handlers return nothing: kopf would store a returned value in ``status``, which belongs to the
user's view (phase, conditions) and the trainer (progress); the CRD's schema would prune it anyway.
Nothing here holds a finalizer: children are owned through ownerReferences, so deleting a
FineTuneJob — with the operator running or not — leaves their removal to the garbage collector
(the workspace claim is kept unless ``deleteWithJob``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.techniques.declarations import RunArranger
from kubetune.operator import (
    admitting,
    arranging,
    creating,
    indexing,
    kubeapi,
    metrics,
    naming,
    queueing,
    running,
    settings,
    statusing,
    updating,
)
from kubetune.operator.settings import Settings

FINETUNEJOBS = (GROUP, VERSION, PLURAL)
MANAGED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}


@contextlib.contextmanager
def _reconcile(kind: str, retry: int = 0) -> Iterator[None]:
    started = time.monotonic()
    failed = True
    try:
        yield
        failed = False
    except Exception as exc:
        if kubeapi.is_transient(exc) and not isinstance(exc, kopf.TemporaryError):
            # A 5xx, 429, 409 or broken connection the gateway's own retries did not outlast: kopf
            # runs the handler again (it re-reads everything), after Retry-After or a growing delay,
            # and logs one line instead of a traceback.
            delay = kubeapi.retry_after(exc) or min(2.0 ** retry, 60.0)
            raise kopf.TemporaryError(f"the API server failed: {kubeapi.describe_failure(exc)}; retrying in {delay:g} s",
                                      delay=delay) from exc
        raise
    finally:
        metrics.observe_reconcile(kind, time.monotonic() - started, failed)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    running.configure(settings, memo, absorb_own_write, queue_child_event)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo:
    # kopf and the gateway use the same credentials: service account or kubeconfig (kubeapi.login).
    return kubeapi.login(**kwargs)


@kopf.on.cleanup()
async def disconnect(**_: Any) -> None:
    await stop_queue()  # first: its workers may be writing through the gateway
    await kubeapi.aclose()


@kopf.on.probe(id="api")
def api_probe(**_: Any) -> str:
    return "connected" if kubeapi.is_connected() else "not connected"


def _seen() -> indexing.Seen:
    """What the watches saw (noted by the event handlers below), and our own last status writes."""
    return indexing.Seen.of(indexing.store(), statusing.written())


@kopf.on.create(*FINETUNEJOBS)
@kopf.on.resume(*FINETUNEJOBS)
async def ensure_children(body: kopf.Body, memo: kopf.Memo, retry: int = 0, **_: Any) -> None:
    # On create, and on every operator start for jobs that exist (idempotent: nothing is made twice).
    with _reconcile("FineTuneJob", retry):
        hook = arranging.arranger_for(dict(body))
        if hook is not None:
            await hook.ensure_runs(dict(body), memo.settings)
        else:
            await creating.ensure_children(dict(body), memo.settings, _seen())


def admit(body: kopf.Body, operation: str | None = None, old: kopf.Body | None = None, **_: Any) -> None:
    # The validating webhook: refuse with every problem and its field path.
    problems = admitting.review(dict(body), dict(old) if operation == "UPDATE" and old is not None else None)
    if problems:
        raise kopf.AdmissionError(admitting.refusal(problems), code=422)


# Registered only when KUBETUNE_WEBHOOK_PORT is set: kopf refuses to start with admission handlers
# and no webhook server (running.configure starts one for that port).
if settings.webhook_enabled():
    kopf.on.validate(*FINETUNEJOBS, id="finetunejob", operations=["CREATE", "UPDATE"],
                     ignore_failures=settings.webhook_ignores_failures())(admit)


@kopf.on.update(*FINETUNEJOBS, field="spec")
async def change_spec(body: kopf.Body, memo: kopf.Memo, retry: int = 0, **_: Any) -> None:
    with _reconcile("FineTuneJob", retry):
        await updating.apply_spec_change(dict(body))
        hook = arranging.arranger_for(dict(body))
        if hook is not None:  # e.g. a search passes runPolicy.suspend on to its trials
            await hook.reconcile(body.metadata.namespace or "default", body.metadata.name, memo.settings)


def _note_finetunejob(namespace: str | None, body: Mapping[str, Any], *, deleted: bool) -> None:
    indexing.store().note_finetunejob(namespace, body, deleted=deleted)
    running.track_phase((body.get("metadata") or {}).get("uid"), (body.get("status") or {}).get("phase"),
                        deleted=deleted)


@kopf.on.event(*FINETUNEJOBS)
async def count_phases(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    # Event handlers are coroutines: kopf would run a plain function in a thread each time. One
    # handler for every FineTuneJob event: a second one (or a ``when=`` filter, which kopf calls
    # with a full set of kwargs) costs kopf's per-handler work on each of them.
    deleted = event["type"] == "DELETED"
    _note_finetunejob(namespace, body, deleted=deleted)
    if deleted:
        statusing.forget(namespace or "default", body.metadata.name or "")
    elif statusing.stop_not_shown(body):
        # The trainer reported an early stop that is not a condition yet (its Job may send no more events).
        with _reconcile("FineTuneJob"):
            await statusing.refresh(namespace or "default", body.metadata.name or "", _seen())


_CHILD_LABELS = tuple(hook.CHILD_LABEL for hook in arranging.arrangers().values())


def absorb_own_write(resource: Any, raw_event: Mapping[str, Any]) -> bool:
    """A FineTuneJob event that is one of this operator's own status writes coming back (its
    resourceVersion is one a write returned, ``statusing.take_echo``): noted here as ``count_phases``
    would, and kept from kopf (``watching``: 3 of the 13 events of a lifecycle). Not when
    ``count_phases`` would do more (an early stop to show) or the job is a run another handler
    follows (``follow_runs``)."""
    if resource.plural != PLURAL or resource.group != GROUP:
        return False
    body = raw_event.get("object") or {}
    meta = body.get("metadata") or {}
    version = meta.get("resourceVersion")
    if not version or not statusing.take_echo(meta.get("namespace") or "default", meta.get("name") or "", version):
        return False
    labels = meta.get("labels") or {}
    if any(label in labels for label in _CHILD_LABELS) or statusing.stop_not_shown(body):
        return False
    _note_finetunejob(meta.get("namespace"), body, deleted=False)
    return True


def _follow_runs_of(hook: RunArranger) -> Any:
    async def follow_run(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
        parent = hook.parent_name(dict(body))
        if parent:
            with _reconcile("Trial"):
                await hook.reconcile(namespace or "default", parent, memo.settings)

    return follow_run


# One handler per technique whose operator hook makes runs: each event of a run goes to its hook.
for _key, _hook in arranging.arrangers().items():
    kopf.on.event(*FINETUNEJOBS, labels={_hook.CHILD_LABEL: kopf.PRESENT}, id=f"follow_runs/{_key}")(_follow_runs_of(_hook))


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def follow_job(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    # While the work queue runs, only kopf's listings (at start-up, after a 410) come here to be
    # handled; the watch events are taken before kopf (``queue_child_event``).
    if event.get(QUEUED):
        return
    deleted = event["type"] == "DELETED"
    indexing.store().note_job(namespace, body, deleted=deleted)
    owner_namespace, owner = indexing.owner_key(namespace, body)
    with _reconcile("Job"):
        await statusing.refresh(owner_namespace, owner, _seen(), deleted_job=dict(body) if deleted else None)
        if deleted:  # an unfinished run gets its Job back (a finished one never does)
            await creating.restore_job(owner_namespace, owner, memo.settings)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def follow_pod(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    if event.get(QUEUED):
        return
    if body.metadata.annotations.get(naming.ANNOTATION_JOB):
        deleted = event["type"] == "DELETED"
        indexing.store().note_pod(namespace, body, deleted=deleted)
        owner_namespace, owner = indexing.owner_key(namespace, body)
        with _reconcile("Pod"):
            await statusing.refresh(owner_namespace, owner, _seen())
            # A pod of a Job that is gone stopped: the Job is made again once its pods are all down.
            # While the watches still hold the Job there is nothing to restore (no reads at scale).
            stopped = deleted or (body.get("status") or {}).get("phase") in _STOPPED
            if stopped and _seen().job(owner_namespace, owner) is None:
                await creating.restore_job(owner_namespace, owner, memo.settings)


# The work queue of the Jobs' and pods' events (``queueing``): one per event loop (tests run several
# operators in one process), started by ``start_queue`` and stopped with the operator.
_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, queueing.WorkQueue] = weakref.WeakKeyDictionary()
#: Set on a DELETED event ``queue_child_event`` queued and still hands to kopf (so that kopf frees
#: what it remembers of the object): the handlers above do nothing with it.
QUEUED = "kubetune.io/queued"
_STOPPED = ("Succeeded", "Failed")
_JOBS = ("batch", "jobs")
_PODS = ("", "pods")


def queue_child_event(resource: Any, raw_event: Mapping[str, Any]) -> bool:
    """An event of a managed Job or pod, before kopf (``watching``): noted in the store at once, in
    stream order (as ``follow_job``/``follow_pod`` note it), and its FineTuneJob added to the work
    queue, whose workers refresh the status and restore a Job that went away
    (``reconcile_children``); kopf gets a BOOKMARK. A DELETED event goes on to kopf as well, marked
    ``QUEUED`` (the handlers return at once): kopf remembers every object it has processed an event
    of (all of them after a listing) and forgets one only on a DELETED event it processes.
    False (kopf processes the event with the handlers above) when the queue is not running in this
    loop or the object is not the operator's."""
    kind = (getattr(resource, "group", None), getattr(resource, "plural", None))
    if kind != _JOBS and kind != _PODS:
        return False
    queue = _queues.get(asyncio.get_running_loop())
    event_type = raw_event.get("type")
    if queue is None or not queue.running or event_type not in ("ADDED", "MODIFIED", "DELETED"):
        return False
    body = raw_event.get("object") or {}
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(naming.LABEL_MANAGED_BY) != naming.MANAGED_BY:
        return False  # not what follow_job/follow_pod select: kopf filters it as always
    namespace = meta.get("namespace")
    deleted = event_type == "DELETED"
    if kind == _JOBS:
        indexing.store().note_job(namespace, body, deleted=deleted)
        queue.add(indexing.owner_key(namespace, body), queueing.Work(
            deleted_job=dict(body) if deleted else None, job_deleted=deleted))
    elif (meta.get("annotations") or {}).get(naming.ANNOTATION_JOB):
        indexing.store().note_pod(namespace, body, deleted=deleted)
        stopped = deleted or (body.get("status") or {}).get("phase") in _STOPPED
        queue.add(indexing.owner_key(namespace, body), queueing.Work(pod_stopped=stopped))
    # (a managed pod without the job-name annotation: follow_pod does nothing with it either)
    if deleted:
        raw_event[QUEUED] = True  # type: ignore[index]
        return False
    return True


def _reconciler(settings: Settings) -> queueing.Reconcile:
    async def reconcile_children(key: queueing.Key, work: queueing.Work) -> None:
        """One FineTuneJob's status from what the store holds now, for every event collapsed into ``work``."""
        namespace, name = key
        with _reconcile("Job"):  # the FineTuneJob's Job and its pods (kopf's handlers: "Job" or "Pod" per event)
            await statusing.refresh(namespace, name, _seen(), deleted_job=work.deleted_job)
            # A deleted Job of an unfinished run is made again (follow_job); so is the Job of a
            # stopped pod when no Job is seen (follow_pod), once all its pods are down.
            if work.job_deleted or (work.pod_stopped and _seen().job(namespace, name) is None):
                await creating.restore_job(namespace, name, settings)

    return reconcile_children


@kopf.on.startup()
async def start_queue(memo: kopf.Memo, **_: Any) -> None:
    # After ``configure`` (kopf runs startup handlers in order), which put the Settings in the memo.
    queue = queueing.WorkQueue(_reconciler(memo.settings))
    _queues[asyncio.get_running_loop()] = queue
    queue.start()


async def stop_queue() -> None:
    """Cancel this operator's queue workers (``disconnect``, kopf's cleanup)."""
    queue = _queues.pop(asyncio.get_running_loop(), None)
    if queue is not None:
        await queue.stop()
