"""
An in-process Kubernetes API server for tests: kmock's emulator, taught the semantics we rely on.

The operator tests, the trainer's status reporting tests and the end-to-end tests talk to this
server over real HTTP (loopback) with the very clients the product uses: kopf, the ``kubernetes``
python client, and subprocesses that read ``KUBECONFIG``. The fixtures in ``tests/conftest.py``
start it through :class:`EmulatorThread`; nothing in the product imports it.

kmock (``kmock.KubernetesEmulator``) gives the HTTP plumbing, the request DSL for fault injection
(``emulator['patch', kmock.resource(...)] << 500``), API discovery and the ``objects`` store with
history. Its own object handling merges dicts and nothing more, so this subclass replaces the
handling of every resource URL (``/api/v1/…``, ``/apis/<group>/<version>/…``) with the rules below.

What this emulator guarantees (checked by ``tests/k8s_emulator/test_emulator.py``):

* metadata on create: ``uid``, ``creationTimestamp``, ``resourceVersion`` (one global counter,
  bumped on every write, like etcd's revision), ``generation`` = 1 for custom resources and
  workload kinds (Jobs, CRDs, Deployments…); ``generateName`` makes a name; ``kind``/``apiVersion``
  are filled from the URL when absent (a mismatch is 400), the namespace comes from the URL
  (a different one in the body is 400);
* ``generation`` +1 only when something outside ``metadata`` (and ``status``, where there is a
  status subresource) changes, and +1 when deletion starts, as in the apiserver;
* the status subresource (finetunejobs, jobs, pods, services, PVCs, CRDs, namespaces): status is
  dropped on create, writes to the main resource keep the old status, ``/status`` writes change
  only the status (metadata too is kept, as for custom resources);
* GET/LIST/WATCH/POST/PUT/PATCH/DELETE and deletecollection, namespaced and cluster-wide URLs;
  PATCH as merge patch, JSON patch (a failed ``test`` op is 422, as kopf expects) and an
  approximate strategic merge patch for built-in kinds (415 for custom resources, as the real
  server); ``application/apply-patch+yaml`` is approximated as create-or-merge;
* errors as ``Status`` bodies: 404 for a missing object, resource or namespace, 409
  AlreadyExists on a duplicate create, 409 Conflict when a PUT/PATCH body (or delete
  preconditions) carries a stale ``metadata.resourceVersion``, 422 for a PUT of a custom
  resource without one, 422 for new finalizers on an object being deleted;
* no-op writes change nothing: no new resourceVersion, no watch event;
* deletion with finalizers: ``deletionTimestamp`` is set, the object stays until the last
  finalizer is removed, then it is gone (DELETED event);
* garbage collection by ``ownerReferences[].uid`` when an owner is really removed: dependents are
  deleted (Background and Foreground alike), or stripped of the reference with ``Orphan``; the
  default is Orphan for ``batch/v1`` Jobs (as the apiserver does for API clients) and Background
  otherwise; deleting a namespace deletes its objects, deleting a CRD deletes its objects;
* label selectors (full grammar) and field selectors (any dotted path) on list and watch,
  ``limit``/``continue`` paging;
* watch streams: ``resourceVersion`` continues exactly after that version (no gap, no repeat),
  none or ``"0"`` starts with synthetic ADDED events; ``sendInitialEvents`` ends with the
  initial-events-end BOOKMARK; ``timeoutSeconds`` closes the stream; ``allowWatchBookmarks``
  gets a BOOKMARK every ``bookmark_interval`` seconds; an object that starts or stops matching a
  selector arrives as ADDED or DELETED;
* pod logs (``GET pods/<name>/log``): 404 without the pod, 400 for a wrong ``container`` or a pod
  not started yet, ``tailLines``, ``follow=true`` streaming until the pod has ended; the text comes
  from :attr:`ApiServerEmulator.pod_logs` (a kubelet's log files) or :meth:`set_pod_log`;
* creating a CustomResourceDefinition serves its resource (discovery included) and marks it
  Established; finetunejobs.kubetune.io is served from the start (from ``crds/`` when the
  generated CRD is there, else a minimal schema-less CRD); namespaces ``default`` and
  ``kube-system`` exist.

What it does not do (a real cluster does): authentication, authorization/RBAC, admission,
schema validation, defaulting and pruning of unknown fields, name validation, controllers
(no pods run, Jobs get no status, Services get no endpoints — tests play the controller by
writing status), field managers and ``managedFields``, graceful pod termination, 410 Gone for old
resource versions (the whole history is kept), protobuf/CBOR, and strategic merge keys beyond
``patching.MERGE_KEYS``. GC is synchronous here, asynchronous there: poll, do not assume order.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import concurrent.futures
import copy
import datetime
import json
import pathlib
import random
import string
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import aiohttp.test_utils
import attrs
import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

from tests.support import patching, selecting

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
ALL_VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
CRD_GROUP, CRD_PLURAL = "apiextensions.k8s.io", "customresourcedefinitions"

# Built-in kinds whose objects carry metadata.generation (custom resources always do).
GENERATION_TRACKED = frozenset({
    ("batch", "jobs"), ("batch", "cronjobs"),
    ("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets"), ("apps", "replicasets"),
    (CRD_GROUP, CRD_PLURAL),
})
# DefaultGarbageCollectionPolicy of the apiserver: OrphanDependents for batch/v1 Jobs.
ORPHAN_BY_DEFAULT = frozenset({("batch", "v1", "jobs")})

FINETUNEJOB_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "finetunejobs.kubetune.io"},
    "spec": {
        "group": "kubetune.io",
        "scope": "Namespaced",
        "names": {"plural": "finetunejobs", "singular": "finetunejob", "kind": "FineTuneJob",
                  "listKind": "FineTuneJobList", "shortNames": ["ftj"]},
        "versions": [{
            "name": "v1alpha1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}


def default_crds() -> list[dict[str, Any]]:
    """The CRDs served from the start: those in ``crds/``, plus finetunejobs if not among them."""
    crds: list[dict[str, Any]] = []
    for path in sorted((REPO_ROOT / "crds").glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
    if not any(crd["metadata"]["name"] == FINETUNEJOB_CRD["metadata"]["name"] for crd in crds):
        crds.append(copy.deepcopy(FINETUNEJOB_CRD))
    return crds


class ApiError(Exception):
    """An API failure, rendered as a ``Status`` body with the same code as the real server's."""

    def __init__(self, status: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message, self.details = status, reason, message, details

    def body(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details,
                "code": self.status}


@attrs.frozen
class Address:
    """A resource URL taken apart: ``/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>/<sub>``."""
    group: str
    version: str
    plural: str
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @classmethod
    def parse(cls, path: str) -> Address | None:
        parts = [part for part in path.strip("/").split("/") if part]
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None  # discovery and non-Kubernetes paths stay with kmock's scaffold
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            return None
        return cls(group, version, rest[0], namespace,
                   rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)


@attrs.frozen
class Change:
    """One committed write, kept for watch streams: what the object was and what it became."""
    rv: int
    group: str
    plural: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


def _tolerant_parse_path(path: str, _parse: Callable[[str], Any] = kmock_parsing.parse_path) -> Any:
    """kmock 0.8 fails on ``/api/v1/namespaces`` (no name after "namespaces"): parse that as a plain list."""
    try:
        return _parse(path)
    except ValueError:
        return kmock_parsing.ParsedPath()


if kmock_parsing.parse_path.__name__ != _tolerant_parse_path.__name__:
    kmock_parsing.parse_path = _tolerant_parse_path  # our own handler re-parses the URL anyway


def prune(value: Any, schema: Any) -> Any:
    """Drop the fields a structural schema does not declare, as the apiserver does for custom resources."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, list):
        return [prune(item, schema.get("items")) for item in value]
    if not isinstance(value, dict):
        return value
    properties = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or additional is True
    embedded = bool(schema.get("x-kubernetes-embedded-resource"))
    pruned: dict[str, Any] = {}
    for key, item in value.items():
        if key in properties:
            pruned[key] = prune(item, properties[key])
        elif isinstance(additional, dict):
            pruned[key] = prune(item, additional)
        elif keep_unknown or (embedded and key in ("apiVersion", "kind", "metadata")):
            pruned[key] = item
    return pruned


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.setdefault("metadata", {})


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server semantics listed in the module docstring."""

    bookmark_interval: float = 30.0
    require_namespaces: bool = True
    #: Where a pod's container log comes from: ``(namespace, pod) -> path of a (growing) log file,
    #: the text itself, or None`` (a test's kubelet sets it; :meth:`set_pod_log` fills a default one).
    pod_logs: Callable[[str, str], pathlib.Path | str | None] | None = None

    _rv: int = attrs.field(default=0, init=False)
    _journal: list[Change] = attrs.field(factory=list, init=False)
    _wakeup: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _crds: dict[tuple[str, str], dict[str, Any]] = attrs.field(factory=dict, init=False)
    _deletion_policies: dict[str, str] = attrs.field(factory=dict, init=False)
    _log_texts: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False)
    _resource_reaction: Any = attrs.field(default=None, init=False)
    _own_reactions: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        # Above kmock's own fallbacks (sub-priority +1 within -inf), below any reaction a test adds.
        (self.fallback ** 1)[self._is_resource_request] << self._serve_resource_request
        self._resource_reaction = self._payloads[-1]
        self._own_reactions = len(self._payloads)
        for name in ("default", "kube-system"):
            self.create_object("v1/namespaces", None, {"metadata": {"name": name}})
        for crd in default_crds():
            self.create_object(f"{CRD_GROUP}/v1/{CRD_PLURAL}", None, crd)

    # kmock's own _handle() merges writes into its store before routing; we route directly.
    async def _handle(self, request: kmock.Request) -> Any:
        # kmock matches a request to a reaction by filtering every request it ever received (quadratic
        # in the number of requests: most of the CPU at a few thousand objects). While a test has added
        # no reactions of its own (fault injection), a resource URL goes straight to ours.
        if len(self._payloads) == self._own_reactions and self._is_resource_request(request):
            return await self._resource_reaction(request)
        return await kmock.RawHandler._handle(self, request)

    def shutdown(self) -> None:
        """End all watch streams (call before the HTTP server stops, so it need not wait)."""
        self._closing = True
        self._notify()

    @property
    def resource_version(self) -> int:
        return self._rv

    # ---------------------------------------------------------------- resources and CRDs

    def register_crd(self, crd: dict[str, Any]) -> None:
        """Serve the custom resource that a CustomResourceDefinition describes."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = set(version.get("subresources") or {})
            self.resources[kmock.resource(spec["group"], version["name"], names["plural"])] = kmock.ResourceInfo(
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                kind=names["kind"], singular=names.get("singular", names["kind"].lower()),
                verbs=ALL_VERBS, shortnames=names.get("shortNames", ()),
                categories=names.get("categories", ()), subresources=subresources,
            )
        self._crds[(spec["group"], names["plural"])] = crd

    def _unregister_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        self._crds.pop((spec["group"], spec["names"]["plural"]), None)
        for version in spec["versions"]:
            resource = kmock.resource(spec["group"], version["name"], spec["names"]["plural"])
            if resource in self.resources:
                del self.resources[resource]
            for key, obj in list(self.objects.items()):
                if key[0] == resource and not obj.deleted:
                    self._remove(key, copy.deepcopy(obj.raw), "Background")

    def _prune(self, address: Address, obj: dict[str, Any]) -> dict[str, Any]:
        """Prune a custom resource by its CRD's schema; other objects are returned as they are."""
        crd = self._crds.get((address.group, address.plural))
        if crd is None:
            return obj
        version = next((v for v in crd["spec"]["versions"] if v["name"] == address.version), {})
        schema = (version.get("schema") or crd["spec"].get("validation") or {}).get("openAPIV3Schema")
        if not schema:
            return obj
        kept = {k: obj[k] for k in ("apiVersion", "kind", "metadata") if k in obj}
        body = prune({k: v for k, v in obj.items() if k not in kept}, schema)
        return {**kept, **body}

    def _get_resources(self) -> list[kmock.resource]:
        # Discovery serves the registered resources only (kmock adds those of stored objects, even deleted ones).
        return kmock.KubernetesScaffold._get_resources(self)

    def _info(self, address: Address) -> kmock.ResourceInfo:
        if address.resource not in self.resources:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                            f"({address.api_version} {address.plural})")
        return self.resources[address.resource]

    def _has_status(self, address: Address) -> bool:
        return "status" in self._info(address).subresources

    def _tracks_generation(self, address: Address) -> bool:
        return (address.group, address.plural) in self._crds or (address.group, address.plural) in GENERATION_TRACKED

    @staticmethod
    def _address(resource: str | kmock.resource, namespace: str | None = None, name: str | None = None,
                 subresource: str | None = None) -> Address:
        res = resource if isinstance(resource, kmock.resource) else kmock.resource(resource)
        if res.group is None or res.version is None or res.plural is None:
            raise ValueError(f"name the resource fully, e.g. 'v1/configmaps' or 'kubetune.io/v1alpha1/finetunejobs': {resource!r}")
        return Address(res.group, res.version, res.plural, namespace, name, subresource)

    # ---------------------------------------------------------------- storage and journal

    def _key(self, address: Address, name: str | None = None) -> tuple[kmock.resource, str | None, str]:
        return (address.resource, address.namespace, name or address.name or "")

    def _current(self, key: tuple[kmock.resource, str | None, str]) -> dict[str, Any] | None:
        stored = self._stored(key)
        return copy.deepcopy(stored) if stored is not None else None

    def _stored(self, key: tuple[kmock.resource, str | None, str]) -> dict[str, Any] | None:
        """The stored version itself, not a copy: for reading only (stored versions never change in place)."""
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw  # type: ignore[no-any-return]
        return None

    def _live(self, address: Address) -> Iterator[tuple[tuple[kmock.resource, str | None, str], dict[str, Any]]]:
        resource = address.resource  # built once: a kmock.resource is costly to make (per object, it was most of a LIST)
        for key, obj in list(self.objects.items()):
            if key[0] != resource or obj.deleted:
                continue
            if address.namespace is not None and key[1] != address.namespace:
                continue
            yield key, obj.raw

    def _notify(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _commit(self, address: Address, key: Any, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        self._rv += 1
        _meta(obj)["resourceVersion"] = str(self._rv)
        stored = copy.deepcopy(obj)
        if kind == "DELETED":
            self.objects[key].history.append(stored)
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].history.append(stored)
        else:
            self.objects[key] = stored
        # The journal shares the stored version: stored versions are never changed in place (every
        # write makes a new one), and watch streams only serialise them.
        self._journal.append(Change(self._rv, address.group, address.plural, kind, stored, old))
        self._notify()
        return obj

    # ---------------------------------------------------------------- operations (loop thread)

    def read_object(self, resource: str | kmock.resource, namespace: str | None, name: str) -> dict[str, Any]:
        return self._read(self._address(resource, namespace, name))

    def create_object(self, resource: str | kmock.resource, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        return self._create(self._address(resource, namespace), body)

    def patch_object(self, resource: str | kmock.resource, namespace: str | None, name: str, patch: Any, *,
                     subresource: str | None = None, content_type: str = patching.MERGE_PATCH) -> dict[str, Any]:
        return self._patch(self._address(resource, namespace, name, subresource), patch, content_type)

    def delete_object(self, resource: str | kmock.resource, namespace: str | None, name: str,
                      propagation_policy: str | None = None) -> dict[str, Any]:
        options = {"propagationPolicy": propagation_policy} if propagation_policy else {}
        return self._delete(self._address(resource, namespace, name), options)

    def list_objects(self, resource: str | kmock.resource, namespace: str | None = None,
                     label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else {}
        return copy.deepcopy(self._list(self._address(resource, namespace), params)["items"])

    def _read(self, address: Address, *, copied: bool = True) -> dict[str, Any]:
        """The object at ``address``; ``copied=False`` gives the stored version itself (read-only: the
        write paths read it, patch a copy and commit that; a copy per step was most of a write's cost)."""
        info = self._info(address)
        if address.subresource is not None and address.subresource not in info.subresources:
            raise ApiError(404, "NotFound", f"{address.plural} has no subresource {address.subresource!r}")
        if address.subresource not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {address.subresource!r} is not emulated")
        obj = self._current(self._key(address)) if copied else self._stored(self._key(address))
        if obj is None:
            raise ApiError(404, "NotFound", f'{address.plural} "{address.name}" not found',
                           name=address.name, group=address.group, kind=address.plural)
        return obj

    def _check_namespace(self, address: Address, info: kmock.ResourceInfo) -> None:
        if info.namespaced and address.namespace is None:
            raise ApiError(405, "MethodNotAllowed", f"{address.plural} is namespaced: use /namespaces/<ns>/{address.plural}")
        if not info.namespaced and address.namespace is not None:
            raise ApiError(404, "NotFound", f"{address.plural} is cluster-scoped, not in a namespace")
        if info.namespaced and self.require_namespaces:
            if self._current((kmock.resource("", "v1", "namespaces"), None, address.namespace or "")) is None:
                raise ApiError(404, "NotFound", f'namespaces "{address.namespace}" not found',
                               name=address.namespace, kind="namespaces")

    def _create(self, address: Address, body: Any) -> dict[str, Any]:
        info = self._info(address)
        if address.name is not None or address.subresource is not None:
            raise ApiError(405, "MethodNotAllowed", "POST goes to the collection URL")
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        if obj.setdefault("apiVersion", address.api_version) != address.api_version or \
                obj.setdefault("kind", info.kind) != info.kind:
            raise ApiError(400, "BadRequest", f"the API version in the data ({obj['apiVersion']}/{obj['kind']}) "
                                              f"does not match the URL ({address.api_version}/{info.kind})")
        meta = _meta(obj)
        if info.namespaced:
            if meta.setdefault("namespace", address.namespace) != address.namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                                                  "the namespace sent on the request")
        else:
            meta.pop("namespace", None)
        self._check_namespace(address, info)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
            alphabet = string.ascii_lowercase + string.digits
            meta["name"] = meta["generateName"] + "".join(random.choices(alphabet, k=5))
        key = self._key(address, meta["name"])
        if self._stored(key) is not None:
            raise ApiError(409, "AlreadyExists", f'{address.plural} "{meta["name"]}" already exists',
                           name=meta["name"], group=address.group, kind=address.plural)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "generation", "managedFields"):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if self._tracks_generation(address):
            meta["generation"] = 1
        if "status" in info.subresources:
            obj.pop("status", None)
        obj = self._prune(address, obj)
        meta = _meta(obj)
        if (address.group, address.plural) == ("", "namespaces"):
            obj["status"] = {"phase": "Active"}
        if (address.group, address.plural) == (CRD_GROUP, CRD_PLURAL):
            spec = obj.get("spec") or {}
            expected = f"{(spec.get('names') or {}).get('plural')}.{spec.get('group')}"
            if meta["name"] != expected:
                raise ApiError(422, "Invalid", f"metadata.name: must be spec.names.plural+\".\"+spec.group: {expected}")
            self.register_crd(obj)
            obj["status"] = {"acceptedNames": spec["names"], "storedVersions": [v["name"] for v in spec["versions"]],
                             "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now(),
                                             "reason": r, "message": ""}
                                            for t, r in (("NamesAccepted", "NoConflicts"),
                                                         ("Established", "InitialNamesAccepted"))]}
        return self._commit(address, key, "ADDED", obj, None)

    def _precondition(self, address: Address, old: dict[str, Any], rv: Any) -> None:
        if rv not in (None, "") and str(rv) != old["metadata"].get("resourceVersion"):
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {address.plural} "{address.name}": '
                                            "the object has been modified; please apply your changes to the "
                                            "latest version and try again", name=address.name, kind=address.plural)

    def _update(self, address: Address, old: dict[str, Any], candidate: dict[str, Any], *,
                fresh: bool = False) -> dict[str, Any]:
        """Turn a candidate body into the next version of ``old`` and commit it (or nothing).
        ``fresh``: the candidate is this call's own copy (a patch's result), used without copying again;
        ``old`` is only read (it may be the stored version itself)."""
        info = self._info(address)
        if address.subresource == "status" and fresh:
            new = candidate  # the status subresource writes status only: the rest stays old's
            for field in set(new) | set(old):
                if field != "status" and new.get(field) != old.get(field):
                    if field in old:
                        new[field] = copy.deepcopy(old[field])
                    else:
                        del new[field]
        elif address.subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = copy.deepcopy(candidate["status"])
            else:
                new.pop("status", None)
        else:
            new = candidate if fresh else copy.deepcopy(candidate)
            if "status" in info.subresources:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        new = self._prune(address, new)
        meta, old_meta = _meta(new), old["metadata"]
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation", "resourceVersion"):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise ApiError(422, "Invalid", f"metadata.finalizers: Forbidden: no new finalizers can be added "
                                               f"if the object is being deleted, found new finalizers {sorted(added)}")
        if not meta.get("finalizers"):
            meta.pop("finalizers", None)
        if new == old:
            return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no event
        if self._tracks_generation(address):
            skip = {"metadata", "status"} if "status" in info.subresources else {"metadata"}
            if {k: v for k, v in new.items() if k not in skip} != {k: v for k, v in old.items() if k not in skip}:
                meta["generation"] = int(meta.get("generation") or 0) + 1
        key = self._key(address)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            policy = self._deletion_policies.pop(meta["uid"], self._default_policy(address))
            return self._remove(key, new, policy, old=old)
        return self._commit(address, key, "MODIFIED", new, old)

    def _replace(self, address: Address, body: Any) -> dict[str, Any]:
        old = self._read(address, copied=False)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        body_meta = body.get("metadata") or {}
        if body_meta.get("name") not in (None, address.name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        rv = body_meta.get("resourceVersion")
        if not rv and (address.group, address.plural) in self._crds:
            raise ApiError(422, "Invalid", "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
        self._precondition(address, old, rv)
        return self._update(address, old, body)

    def _patch(self, address: Address, patch: Any, content_type: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        info = self._info(address)
        kind = content_type.split(";")[0].strip().lower()
        if kind == patching.STRATEGIC_MERGE_PATCH and (address.group, address.plural) in self._crds:
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
                           "media types include: application/json-patch+json, application/merge-patch+json, "
                           "application/apply-patch+yaml")
        if kind == patching.APPLY_PATCH:
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "an apply patch must be a YAML or JSON object")
            if address.subresource is None and self._current(self._key(address)) is None:
                self._check_namespace(address, info)
                body = copy.deepcopy(patch)
                _meta(body).setdefault("name", address.name)
                return self._create(Address(address.group, address.version, address.plural, address.namespace), body)
            kind = patching.MERGE_PATCH
        old = self._read(address, copied=False)
        try:
            candidate = patching.apply_patch(kind, old, patch)  # a new copy: ``old`` is left as it is
        except patching.PatchError as exc:
            reason = {400: "BadRequest", 415: "UnsupportedMediaType", 422: "Invalid"}.get(exc.status, "Invalid")
            raise ApiError(exc.status, reason, exc.message) from exc
        if not isinstance(candidate, dict):
            raise ApiError(422, "Invalid", "the patched object is not a JSON object")
        self._precondition(address, old, (candidate.get("metadata") or {}).get("resourceVersion"))
        return self._update(address, old, candidate, fresh=True)

    def _default_policy(self, address: Address) -> str:
        return "Orphan" if (address.group, address.version, address.plural) in ORPHAN_BY_DEFAULT else "Background"

    def _delete(self, address: Address, options: dict[str, Any], params: dict[str, str] | None = None) -> dict[str, Any]:
        params = params or {}
        if address.subresource is not None:
            raise ApiError(405, "MethodNotAllowed", "DELETE of a subresource")
        old = self._read(address)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") not in (None, old["metadata"]["uid"]):
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                                            f"UID in object meta: {old['metadata']['uid']}")
        self._precondition(address, old, preconditions.get("resourceVersion"))
        policy = options.get("propagationPolicy") or params.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        policy = policy or self._default_policy(address)
        if policy not in ("Orphan", "Background", "Foreground"):
            raise ApiError(400, "BadRequest", f"propagationPolicy: Unsupported value: {policy!r}")
        meta = old["metadata"]
        if not meta.get("finalizers"):
            return self._remove(self._key(address), old, policy)
        if meta.get("deletionTimestamp"):
            return old
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = _now()
        new["metadata"]["deletionGracePeriodSeconds"] = 0
        if int(meta.get("generation") or 0) > 0:
            new["metadata"]["generation"] = int(meta["generation"]) + 1
        self._deletion_policies[meta["uid"]] = policy
        return self._commit(address, self._key(address), "MODIFIED", new, old)

    def _remove(self, key: Any, obj: dict[str, Any], policy: str, old: dict[str, Any] | None = None) -> dict[str, Any]:
        """Really remove an object (no finalizers left), then collect what depended on it."""
        resource, namespace, name = key
        address = Address(resource.group, resource.version, resource.plural, namespace, name)
        final = self._commit(address, key, "DELETED", obj, old if old is not None else copy.deepcopy(obj))
        uid = obj["metadata"].get("uid")
        for dep_key, dep in list(self._all_live()):
            refs = (dep.get("metadata") or {}).get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            dep_address = Address(dep_key[0].group, dep_key[0].version, dep_key[0].plural, dep_key[1], dep_key[2])
            current = self._current(dep_key)
            if current is None:
                continue
            if policy == "Orphan":
                candidate = copy.deepcopy(current)
                kept = [ref for ref in refs if ref.get("uid") != uid]
                if kept:
                    candidate["metadata"]["ownerReferences"] = kept
                else:
                    candidate["metadata"].pop("ownerReferences", None)
                self._update(dep_address, current, candidate)
            else:
                self._delete(dep_address, {"propagationPolicy": "Background"})
        if (resource.group, resource.plural) == ("", "namespaces"):
            for dep_key, dep in list(self._all_live()):
                if dep_key[1] == name and self._current(dep_key) is not None:
                    self._delete(Address(dep_key[0].group, dep_key[0].version, dep_key[0].plural,
                                         dep_key[1], dep_key[2]), {})
        if (resource.group, resource.plural) == (CRD_GROUP, CRD_PLURAL):
            self._unregister_crd(obj)
        return final

    def _all_live(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        for key, obj in list(self.objects.items()):
            if not obj.deleted:
                yield key, obj.raw

    def _selectors(self, params: dict[str, str]) -> Callable[[dict[str, Any]], bool]:
        try:
            by_label = selecting.parse_label_selector(params.get("labelSelector"))
            by_field = selecting.parse_field_selector(params.get("fieldSelector"))
        except selecting.SelectorError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from exc
        return lambda obj: by_label(obj) and by_field(obj)

    def _list(self, address: Address, params: dict[str, str]) -> dict[str, Any]:
        info = self._info(address)
        selected = self._selectors(params)
        # Not copied: an HTTP answer only serialises them (list_objects copies for in-process callers).
        items = sorted((obj for _, obj in self._live(address) if selected(obj)),
                       key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        list_rv, start = self._rv, 0
        if params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(params["continue"]))
                list_rv, start = int(token["rv"]), int(token["start"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ApiError(400, "BadRequest", f"invalid continue token: {exc}") from exc
        metadata: dict[str, Any] = {"resourceVersion": str(list_rv)}
        limit = int(params.get("limit") or 0)
        if limit > 0:
            if start + limit < len(items):
                token = json.dumps({"rv": list_rv, "start": start + limit}).encode()
                metadata["continue"] = base64.urlsafe_b64encode(token).decode()
                metadata["remainingItemCount"] = len(items) - start - limit
            items = items[start:start + limit]
        else:
            items = items[start:]
        return {"kind": f"{info.kind}List", "apiVersion": address.api_version, "metadata": metadata, "items": items}

    def _delete_collection(self, address: Address, options: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        listed = self._list(address, params)
        for obj in listed["items"]:
            meta = obj["metadata"]
            self._delete(Address(address.group, address.version, address.plural, meta.get("namespace"), meta["name"]),
                         options, params)
        return listed

    # ---------------------------------------------------------------- watching

    def _watch(self, address: Address, params: dict[str, str]) -> AsyncIterator[Any]:
        info = self._info(address)
        selected = self._selectors(params)
        since = params.get("resourceVersion") or None
        try:
            since_rv = int(since) if since not in (None, "0") else None
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"invalid watch parameter: {exc}") from exc
        initial_events = params.get("sendInitialEvents") == "true"
        bookmarks = params.get("allowWatchBookmarks") == "true"

        def matches(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            meta = obj.get("metadata") or {}
            if address.namespace is not None and meta.get("namespace") != address.namespace:
                return False
            if address.name is not None and meta.get("name") != address.name:
                return False
            return selected(obj)

        def bookmark(**annotations: str) -> dict[str, Any]:
            meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
            if annotations:
                meta["annotations"] = annotations
            return {"type": "BOOKMARK", "object": {"kind": info.kind, "apiVersion": address.api_version, "metadata": meta}}

        # Snapshot synchronously (no await) so that no change falls between the snapshot and the journal position.
        if since_rv is None or initial_events:
            initial = [{"type": "ADDED", "object": copy.deepcopy(obj)} for _, obj in self._live(address) if matches(obj)]
            position = len(self._journal)
        else:
            initial = []
            position = bisect.bisect_right([change.rv for change in self._journal], since_rv)

        async def stream() -> AsyncIterator[Any]:
            nonlocal position
            yield b""  # send the headers now, even if no event comes for a while
            for event in initial:
                yield event
            if initial_events:
                yield bookmark(**{"k8s.io/initial-events-end": "true"})
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout is not None else None
            next_bookmark = loop.time() + self.bookmark_interval
            while not self._closing:
                while position < len(self._journal):
                    change = self._journal[position]
                    position += 1
                    if (change.group, change.plural) != (address.group, address.plural):
                        continue
                    now_in, was_in = matches(change.obj), matches(change.old)
                    if change.type == "MODIFIED" and now_in != was_in:
                        kind = "ADDED" if now_in else "DELETED"
                    elif change.type == "DELETED":
                        kind = "DELETED" if was_in or now_in else ""
                    else:
                        kind = change.type if now_in else ""
                    if kind:  # no copy per watcher: the journal's version is only serialised
                        yield {"type": kind, "object": change.obj}
                waiter = self._wakeup
                wait = next_bookmark - loop.time()
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                try:
                    await asyncio.wait_for(waiter.wait(), timeout=max(wait, 0.0))
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        return
                    if loop.time() >= next_bookmark:
                        next_bookmark = loop.time() + self.bookmark_interval
                        if bookmarks:
                            yield bookmark()

        return stream()

    # ---------------------------------------------------------------- pod logs

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        """The whole log of a pod's container, for tests without a kubelet (``append`` by setting again)."""
        self._log_texts[(namespace, pod)] = text

    def _log_text(self, namespace: str, pod: str) -> str:
        source = self.pod_logs(namespace, pod) if self.pod_logs is not None else None
        if source is None:
            return self._log_texts.get((namespace, pod), "")
        if isinstance(source, pathlib.Path):
            return source.read_text(errors="replace") if source.exists() else ""
        return source

    def _pod_log(self, address: Address, params: dict[str, str]) -> AsyncIterator[bytes]:
        """``GET pods/<name>/log`` as the kubelet answers it through the API server: 404 without the
        pod, 400 for an unknown ``container`` or one not started yet; ``tailLines``; ``follow=true``
        streams what the log gains until the pod has ended (or is deleted)."""
        key = (kmock.resource("", "v1", "pods"), address.namespace, address.name or "")
        pod = self._current(key)
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{address.name}" not found', name=address.name, kind="pods")
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = params.get("container") or (containers[0] if len(containers) == 1 else None)
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {params.get('container')!r} is not valid for pod {address.name}"
                           if params.get("container") else f"a container name must be specified for pod {address.name}")
        if (pod.get("status") or {}).get("phase") in (None, "Pending"):
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{address.name}" is waiting to start')
        namespace, name = address.namespace or "", address.name or ""
        follow = params.get("follow") in ("true", "1")
        tail = int(params["tailLines"]) if params.get("tailLines") else None

        async def stream() -> AsyncIterator[bytes]:
            yield b""  # send the headers now
            text = self._log_text(namespace, name)
            if tail is not None:
                lines = text.splitlines(keepends=True)
                shown = "".join(lines[-tail:]) if tail > 0 else ""
            else:
                shown = text
            if shown:
                yield shown.encode()
            sent = len(text)
            while follow and not self._closing:
                current = self._current(key)
                ended = current is None or (current.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                text = self._log_text(namespace, name)
                if len(text) > sent:
                    yield text[sent:].encode()
                    sent = len(text)
                if ended:
                    return
                await asyncio.sleep(0.05)

        return stream()

    # ---------------------------------------------------------------- HTTP entry point

    @staticmethod
    def _is_resource_request(request: kmock.Request) -> bool:
        return Address.parse(request.url.path) is not None

    def _serve_resource_request(self, request: kmock.Request) -> Any:
        address = Address.parse(request.url.path)
        assert address is not None  # guaranteed by _is_resource_request()
        params = dict(request.params)
        method = str(request.method.value).upper()
        content_type = {k.lower(): v for k, v in request.headers.items()}.get("content-type", "application/json")
        try:
            body = request.data
            if content_type.split(";")[0].strip().lower() == patching.APPLY_PATCH:
                body = yaml.safe_load(request.text) if request.text else None
            # NB: always an explicit status: kmock keeps the last rendered status on the reaction.
            if method == "GET" and address.plural == "pods" and address.subresource == "log" and not address.group:
                return kmock.Response(status=200, payload=self._pod_log(address, params))
            if method == "GET" and params.get("watch") in ("true", "1"):
                return kmock.Response(status=200, payload=self._watch(address, params))
            if method == "GET":
                found = self._list(address, params) if address.name is None else self._read(address)
                return kmock.Response(status=200, payload=found)
            if method == "POST":
                return kmock.Response(status=201, payload=self._create(address, body))
            if method == "PUT" and address.name is not None:
                return kmock.Response(status=200, payload=self._replace(address, body))
            if method == "PATCH" and address.name is not None:
                return kmock.Response(status=200, payload=self._patch(address, body, content_type, params))
            if method == "DELETE":
                options = body if isinstance(body, dict) else {}
                if address.name is None:
                    return kmock.Response(status=200, payload=self._delete_collection(address, options, params))
                return kmock.Response(status=200, payload=self._delete(address, options, params))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {request.url.path}")
        except ApiError as exc:
            return kmock.Response(status=exc.status, payload=exc.body())


T = TypeVar("T")


class EmulatorThread:
    """
    Runs an :class:`ApiServerEmulator` on a free loopback port in a thread with its own event loop.

    Synchronous tests, kopf (in its own thread) and subprocesses all reach it over HTTP at
    :attr:`url`. The ``*_object`` helpers act on the store directly (same semantics as HTTP,
    events included) and are safe to call from the test's thread.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 emulator_class: type[ApiServerEmulator] | None = None, **options: Any) -> None:
        self._host = host
        self._port = port
        self._emulator_class = emulator_class or ApiServerEmulator
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.emulator: ApiServerEmulator | None = None
        self.url: str = ""

    def start(self, timeout: float = 10.0) -> EmulatorThread:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="k8s-emulator", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or self._failure is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._failure!r}")
        return self

    def _run(self, started: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(started))
        except BaseException as exc:  # reported to start() or stop()
            self._failure = exc
            started.set()
        finally:
            self._loop.close()

    async def _serve(self, started: threading.Event) -> None:
        self._stopping = asyncio.Event()
        async with self._emulator_class(**self._options) as emulator:
            server = aiohttp.test_utils.RawTestServer(emulator, host=self._host, port=self._port)
            await server.start_server()
            try:
                self.emulator = emulator
                self.url = str(server.make_url("")).rstrip("/")
                started.set()
                await self._stopping.wait()
                emulator.shutdown()
                await asyncio.sleep(0.01)  # let the watch streams see the shutdown and end
            finally:
                await server.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the emulator's loop thread and return its result."""
        assert self._loop is not None, "the emulator is not running"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    # Direct access to the store, for arranging and inspecting state without a client.
    def get_object(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.call(self._emulator.read_object, resource, namespace, name)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create_object(self, resource: str, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        return self.call(self._emulator.create_object, resource, namespace, body)

    def patch_object(self, resource: str, namespace: str | None, name: str, patch: Any, **kwargs: Any) -> dict[str, Any]:
        return self.call(self._emulator.patch_object, resource, namespace, name, patch, **kwargs)

    def delete_object(self, resource: str, namespace: str | None, name: str, **kwargs: Any) -> dict[str, Any]:
        return self.call(self._emulator.delete_object, resource, namespace, name, **kwargs)

    def list_objects(self, resource: str, namespace: str | None = None, label_selector: str | None = None) -> list[dict[str, Any]]:
        return self.call(self._emulator.list_objects, resource, namespace, label_selector)

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        self.call(self._emulator.set_pod_log, namespace, pod, text)

    @property
    def _emulator(self) -> ApiServerEmulator:
        assert self.emulator is not None, "the emulator is not running"
        return self.emulator

    def kubeconfig(self, *, namespace: str = "default") -> dict[str, Any]:
        """A kubeconfig document pointing at this emulator (plain HTTP, a dummy token)."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubetune-emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "kubetune-tester", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "kubetune-emulator",
                          "context": {"cluster": "kubetune-emulator", "user": "kubetune-tester", "namespace": namespace}}],
            "current-context": "kubetune-emulator",
        }
