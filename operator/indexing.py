"""What the operator's watches have seen, kept in memory so a status decision reads no API.

``kubetune.operator.handlers`` notes every event of a FineTuneJob, and of every Job and trainer pod
carrying the operator's ``managed-by`` label (most of them as the watch stream delivers them, before
kopf: ``handlers.queue_child_event``, ``handlers.absorb_own_write``), in :func:`store` (one per event loop, as the locks in
``statusing``) under ``(namespace, FineTuneJob name)`` — trimmed to the fields ``phases`` judges
by, so a thousand Jobs do not keep a thousand pod templates in memory — and :class:`Seen` answers
``statusing`` from it where the operator would otherwise GET the FineTuneJob and the Job and LIST
the pods on every event (9 reads per lifecycle at N = 1000 before). What the store holds may trail
the API server by an event; every event refreshes its FineTuneJob after noting itself (through the
work queue, ``queueing``: one refresh after the last of the events that came meanwhile), so the
last event of each object decides with everything known.

Why not ``@kopf.index``: the first version used three kopf indexes; kopf invokes an index handler
as a full handler (kwargs, causes, logging) on every event, which was 19% of the operator's event
loop at N = 250 (py-spy). Noting the body in the event handler that runs anyway costs a dict update.

The status the operator itself wrote last is kept too (``statusing.written``): a decision starts
from it rather than from the store while the store has not yet seen that write's watch event.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator import naming

Key = tuple[str, str]
#: key → {uid: entry}: every object seen under that key (a Job of an earlier namesake may linger).
Index = dict[Key, dict[str, dict[str, Any]]]


def _pick(obj: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: obj[k] for k in keys if obj.get(k) is not None}


def _metadata(body: Mapping[str, Any], *extra: str) -> dict[str, Any]:
    return _pick(body.get("metadata") or {}, "name", "namespace", "uid", "resourceVersion", "ownerReferences",
                 "creationTimestamp", "deletionTimestamp", *extra)


def finetunejob_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    """The FineTuneJob as ``statusing`` reads it: metadata, spec, status (not kopf's annotations)."""
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": _metadata(body, "generation", "labels"),
            "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}


def job_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    """The Job as ``phases.observe`` reads it: no pod template."""
    spec = body.get("spec") or {}
    return {"metadata": _metadata(body, "labels"), "spec": _pick(spec, "completions", "suspend"),
            "status": dict(body.get("status") or {})}


def pod_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    """The pod as ``phases`` reads it: metadata and status only."""
    return {"metadata": _metadata(body), "status": dict(body.get("status") or {})}


def owner_key(namespace: str | None, body: Mapping[str, Any]) -> Key:
    """The FineTuneJob a Job or pod belongs to (its ``job-name`` annotation; a Job falls back to its own name)."""
    meta = body.get("metadata") or {}
    return namespace or "default", (meta.get("annotations") or {}).get(naming.ANNOTATION_JOB, meta.get("name", ""))


def resource_version(value: str | None) -> int:
    """A resourceVersion as a number, 0 when it is none (opaque to clients by contract; every API
    server we know uses etcd's integers)."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _rv(obj: Mapping[str, Any] | None) -> int:
    return resource_version(((obj or {}).get("metadata") or {}).get("resourceVersion"))


def _one(index: Index | None, key: Key) -> list[dict[str, Any]]:
    if index is None:
        return []
    return list((index.get(key) or {}).values())


#: How many deleted objects :class:`Store` remembers as gone (see ``Store.note``).
GONE_KEPT = 10_000


@dataclass
class Store:
    """The latest version of every watched object, by the FineTuneJob it belongs to.

    Events reach it from two places that are not ordered with each other: the watch-stream hooks
    (``handlers.queue_child_event``, ``handlers.absorb_own_write``) note as the stream delivers,
    kopf's handlers when kopf's per-object workers get to an event (its listing at start-up among
    them). So a version older than the one held is ignored, and so is any version of an object
    noted as deleted (uids are never reused; the last ``GONE_KEPT`` deletions are remembered)."""

    finetunejobs: Index = field(default_factory=dict)
    jobs: Index = field(default_factory=dict)
    pods: Index = field(default_factory=dict)
    gone: dict[str, None] = field(default_factory=dict)

    def note(self, index: Index, key: Key, body: Mapping[str, Any], entry: Any, *, deleted: bool) -> None:
        uid = str((body.get("metadata") or {}).get("uid") or "")
        bucket = index.get(key)
        if deleted:
            if uid:
                self.gone[uid] = None
                if len(self.gone) > GONE_KEPT:
                    del self.gone[next(iter(self.gone))]
            if bucket is not None:
                bucket.pop(uid, None)
                if not bucket:
                    del index[key]
            return
        if uid in self.gone:
            return
        if bucket is None:
            bucket = index[key] = {}
        held = bucket.get(uid)
        if held is not None and _rv(held) > _rv(body):
            return
        bucket[uid] = entry(body)

    def note_finetunejob(self, namespace: str | None, body: Mapping[str, Any], *, deleted: bool) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        self.note(self.finetunejobs, (namespace or "default", name), body, finetunejob_entry, deleted=deleted)

    def note_job(self, namespace: str | None, body: Mapping[str, Any], *, deleted: bool) -> None:
        self.note(self.jobs, owner_key(namespace, body), body, job_entry, deleted=deleted)

    def note_pod(self, namespace: str | None, body: Mapping[str, Any], *, deleted: bool) -> None:
        self.note(self.pods, owner_key(namespace, body), body, pod_entry, deleted=deleted)


_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Store] = weakref.WeakKeyDictionary()


def per_loop(registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any], make: Any) -> Any:
    """``registry``'s entry for the running event loop, made by ``make()`` the first time (tests run
    several operators in one process, one loop each). Not ``setdefault``: that built the default and
    a weak reference on every call, i.e. on every event."""
    loop = asyncio.get_running_loop()
    found = registry.get(loop)
    if found is None:
        found = registry[loop] = make()
    return found


def store() -> Store:
    """This event loop's store."""
    found: Store = per_loop(_stores, Store)
    return found


@dataclass
class Seen:
    """What a status decision reads: the store, plus the FineTuneJobs as this operator last wrote them."""

    finetunejobs: Index | None = None
    jobs: Index | None = None
    pods: Index | None = None
    written: dict[Key, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, seen: Store, written: dict[Key, dict[str, Any]]) -> Seen:
        return cls(seen.finetunejobs, seen.jobs, seen.pods, written)

    def finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The newest known version of the FineTuneJob (the store's or our own write); None if unknown."""
        indexed = _one(self.finetunejobs, (namespace, name))
        newest = max(indexed, key=_rv) if indexed else None
        mine = self.written.get((namespace, name))
        if mine is None:
            return newest
        if newest is not None and _rv(newest) >= _rv(mine):
            del self.written[(namespace, name)]  # the store has caught up with our write
            return newest
        return mine

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = _one(self.jobs, (namespace, name))
        return max(found, key=_rv) if found else None

    def pods_of(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return _one(self.pods, (namespace, name))
