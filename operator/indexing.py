"""What the operator's watches have seen, kept in kopf indexes so a status decision reads no API.

``kubetune.operator.handlers`` declares three ``@kopf.index`` handlers with the functions here:
every FineTuneJob, and every Job and trainer pod carrying the operator's ``managed-by`` label, are
stored under ``(namespace, FineTuneJob name)`` — trimmed to the fields ``phases`` judges by, so
a thousand Jobs do not keep a thousand pod templates in memory. kopf fills the indexes from the
watch streams it runs anyway (before any handler runs, and on every event before the handlers of
that event), so :class:`Seen` answers ``statusing`` from memory where the operator would otherwise
GET the FineTuneJob and the Job and LIST the pods on every event (9 reads per lifecycle at N = 1000
before). What an index holds may trail the API server by an event: ``statusing`` writes guarded
by ``metadata.resourceVersion``, and a write that conflicts is retried from fresh reads.

The status the operator itself wrote last is kept too (``statusing.written``): a decision starts
from it rather than from the index while the index has not yet seen that write's watch event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator import naming

Key = tuple[str, str]
#: kopf.Index[Key, dict] as this module reads it: key → a collection of values (one per object).
IndexLike = Mapping[Key, Any]


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


def _rv(obj: Mapping[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # opaque to clients by contract; every API server we know uses etcd's integers
        return 0


def _one(index: IndexLike | None, key: Key) -> list[dict[str, Any]]:
    if index is None:
        return []
    return list(index.get(key) or ())


@dataclass
class Seen:
    """The three indexes a handler received, plus the FineTuneJobs as this operator last wrote them."""

    finetunejobs: IndexLike | None = None
    jobs: IndexLike | None = None
    pods: IndexLike | None = None
    written: dict[Key, dict[str, Any]] = field(default_factory=dict)

    def finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The newest known version of the FineTuneJob (an index entry or our own write); None if unknown."""
        indexed = _one(self.finetunejobs, (namespace, name))
        newest = max(indexed, key=_rv) if indexed else None
        mine = self.written.get((namespace, name))
        if mine is None:
            return newest
        if newest is not None and _rv(newest) >= _rv(mine):
            del self.written[(namespace, name)]  # the index has caught up with our write
            return newest
        return mine

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = _one(self.jobs, (namespace, name))
        return max(found, key=_rv) if found else None

    def pods_of(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return _one(self.pods, (namespace, name))
