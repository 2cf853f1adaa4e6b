"""Every kopf handler of the operator, and nothing else: each one delegates in a line or two.

``kubetune operator`` (``kubetune.operator.running``) imports this module; tests load it into a
fresh ``kopf.OperatorRegistry`` with ``kopf.testing.KopfRunner``. What is watched:

* FineTuneJobs: create and resume make the children (``creating``), or the trials of a
  hyperparameter search (``searching``), a spec change is checked and its runPolicy applied
  (``updating``), every event updates the jobs-by-phase metric;
* trials (FineTuneJobs labelled ``kubetune.io/search``): every event moves their search on
  (``searching``: the next trials, the parent's trials/bestTrial/phase); an early stop the
  trainer reported (``progress.stopReason``) and no condition shows yet is written (``statusing``);
* admission of FineTuneJobs (CREATE, UPDATE): the validating webhook (``admitting``), when
  ``KUBETUNE_WEBHOOK_PORT`` turns kopf's webhook server on;
* batch/v1 Jobs and pods carrying the operator's ``managed-by`` label: every event is noted in
  ``indexing``'s store (as is every FineTuneJob event) and recomputes the owning FineTuneJob's
  status from it (``statusing``), reading nothing from the API. No timers, no polling loops.

Handlers return nothing: kopf would store a returned value in ``status``, which belongs to the
user's view (phase, conditions) and the trainer (progress); the CRD's schema would prune it anyway.
Nothing here holds a finalizer: children are owned through ownerReferences, so deleting a
FineTuneJob — with the operator running or not — leaves their removal to the garbage collector
(the workspace claim is kept unless ``deleteWithJob``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import kopf

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.api.searching import SEARCH_LABEL
from kubetune.operator import (
    admitting,
    creating,
    indexing,
    kubeapi,
    metrics,
    naming,
    running,
    searching,
    settings,
    statusing,
    updating,
)

FINETUNEJOBS = (GROUP, VERSION, PLURAL)
MANAGED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}


@contextlib.contextmanager
def _reconcile(kind: str) -> Iterator[None]:
    started = time.monotonic()
    failed = True
    try:
        yield
        failed = False
    finally:
        metrics.observe_reconcile(kind, time.monotonic() - started, failed)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    running.configure(settings, memo)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # The same credentials as the gateway's: the kubernetes client's in-cluster or kubeconfig loading.
    return kopf.login_via_client(**kwargs)


@kopf.on.cleanup()
def disconnect(**_: Any) -> None:
    kubeapi.close()


@kopf.on.probe(id="api")
def api_probe(**_: Any) -> str:
    return "connected" if kubeapi.is_connected() else "not connected"


def _seen() -> indexing.Seen:
    """What the watches saw (noted by the event handlers below), and our own last status writes."""
    return indexing.Seen.of(indexing.store(), statusing.written())


@kopf.on.create(*FINETUNEJOBS)
@kopf.on.resume(*FINETUNEJOBS)
async def ensure_children(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # On create, and on every operator start for jobs that exist (idempotent: nothing is made twice).
    with _reconcile("FineTuneJob"):
        if searching.is_search(dict(body)):
            await searching.ensure_trials(dict(body), memo.settings)
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
async def change_spec(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    with _reconcile("FineTuneJob"):
        await updating.apply_spec_change(dict(body))
        if searching.is_search(dict(body)):  # a search passes runPolicy.suspend on to its trials
            await searching.reconcile(body.metadata.namespace or "default", body.metadata.name, memo.settings)


@kopf.on.event(*FINETUNEJOBS)
async def count_phases(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    # Event handlers are coroutines: kopf would run a plain function in a thread each time.
    deleted = event["type"] == "DELETED"
    indexing.store().note_finetunejob(namespace, body, deleted=deleted)
    running.track_phase(body.metadata.uid, body.get("status", {}).get("phase"), deleted=deleted)
    if deleted:
        statusing.forget(namespace or "default", body.metadata.name or "")


@kopf.on.event(*FINETUNEJOBS, when=lambda body, **_: statusing.stop_not_shown(dict(body)))
async def show_early_stop(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    # The trainer reported an early stop that is not a condition yet (its Job may send no more events).
    with _reconcile("FineTuneJob"):
        await statusing.refresh(namespace or "default", body.metadata.name or "", _seen())


@kopf.on.event(*FINETUNEJOBS, labels={SEARCH_LABEL: kopf.PRESENT})
async def follow_trial(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    parent = searching.parent_name(dict(body))
    if parent:
        with _reconcile("Trial"):
            await searching.reconcile(namespace or "default", parent, memo.settings)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def follow_job(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    indexing.store().note_job(namespace, body, deleted=event["type"] == "DELETED")
    with _reconcile("Job"):
        await statusing.refresh(*indexing.owner_key(namespace, body), _seen())


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def follow_pod(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    if body.metadata.annotations.get(naming.ANNOTATION_JOB):
        indexing.store().note_pod(namespace, body, deleted=event["type"] == "DELETED")
        with _reconcile("Pod"):
            await statusing.refresh(*indexing.owner_key(namespace, body), _seen())
