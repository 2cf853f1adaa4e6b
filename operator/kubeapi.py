"""The one module of the operator that talks to the Kubernetes API.

Handlers and their helpers (``creating``, ``statusing``, ``suspending``) call these coroutines;
nothing else in ``kubetune.operator`` opens a connection (kopf's own watching aside). Calls run
the official ``kubernetes`` client in a worker thread, so kubeconfig, in-cluster tokens and exec
plugins behave exactly as in kubectl. The answers every caller would otherwise have to special-case
are folded in here: :func:`create` treats 409 AlreadyExists as "already there" and returns the
existing object, :func:`get` and :func:`delete` treat 404 as "absent". Every failed request is
counted in ``kubetune.operator.metrics``.

Transient failures — the connection refused or reset, a timeout, 429 Too Many Requests, 502, 503 or
504 (an API server restarting, overloaded or behind a load balancer) — are retried here with
tenacity: at most :data:`RETRY_ATTEMPTS` tries, exponential backoff with full jitter between
:data:`RETRY_WAIT_MIN` and :data:`RETRY_WAIT_MAX` seconds, so a burst of operators does not retry in
step, and never sooner than a ``Retry-After`` header asks (API priority and fairness sends one
with its 429s). Every verb here is safe to repeat (a create that did land answers 409 next time and is then
read back; merge patches are idempotent). A 500 and every other error go to the caller at once:
kopf retries the whole handler with its own backoff (``settings.batching.error_delays``), which
re-reads the world instead of repeating a request that the server refused. What stays hand-written
is the status decisions' retry (``retrying``, also tenacity): on 409 and 500 too it is not a
repeat of the same request but a re-read and a recomputed patch.

:data:`REQUIRED_PERMISSIONS` lists every (API group, resource, verbs) the operator needs, its own
calls plus kopf's watching; each call here checks itself against it, a test compares it with the
requests the operator really makes, and the Helm chart's ClusterRole is tested against it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import logging
import os
import random
from typing import Any

import kubernetes
import tenacity
import urllib3.exceptions
from kubernetes.client import ApiClient, ApiException

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.operator import metrics

logger = logging.getLogger(__name__)

#: (API group, resource, verbs) the operator uses. "" is the core group.
REQUIRED_PERMISSIONS: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, PLURAL, ("get", "list", "watch", "create", "patch")),  # kopf watches and annotates; we read; trials of a search
    (GROUP, f"{PLURAL}/status", ("get", "patch")),  # phase/conditions; also granted on to trainers
    ("batch", "jobs", ("get", "list", "watch", "create", "patch")),
    ("", "pods", ("list", "watch")),
    ("", "configmaps", ("get", "create")),
    ("", "services", ("get", "create")),
    ("", "persistentvolumeclaims", ("get", "create")),
    ("", "serviceaccounts", ("get", "create")),
    ("rbac.authorization.k8s.io", "roles", ("get", "create")),
    ("rbac.authorization.k8s.io", "rolebindings", ("get", "create")),
    ("", "events", ("create",)),
]

#: Held only so that the operator may grant it in each job's Role (RBAC refuses to grant what the
#: granter lacks): the trainer reads its FineTuneJob and patches its status. The operator itself
#: never makes these calls.
GRANTED_TO_TRAINERS: list[tuple[str, str, tuple[str, ...]]] = [
    (GROUP, PLURAL, ("get",)),
    (GROUP, f"{PLURAL}/status", ("get", "patch")),
]

#: kind -> (group, version, plural) of every kind the operator reads or writes.
RESOURCES: dict[str, tuple[str, str, str]] = {
    "FineTuneJob": (GROUP, VERSION, PLURAL),
    "Job": ("batch", "v1", "jobs"),
    "Pod": ("", "v1", "pods"),
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"),
    "ServiceAccount": ("", "v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    "Event": ("", "v1", "events"),
}

MERGE_PATCH = "application/merge-patch+json"
#: How the operator's own requests show up in API server audit logs.
USER_AGENT = "kubetune-operator"
EVENT_SOURCE = "kubetune-operator"

#: Tries of one request that fails transiently (see the module docstring), and the backoff bounds.
RETRY_ATTEMPTS = 4
RETRY_WAIT_MIN = 0.2
RETRY_WAIT_MAX = 5.0
#: The longest ``Retry-After`` honoured; a longer one waits this long (the handler retries later anyway).
RETRY_AFTER_MAX = 30.0
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})

#: Requests in flight at once. The client is synchronous (urllib3), so each in-flight request holds a
#: worker thread and a pooled connection; asyncio's default executor (cores + 4 threads, shared with
#: kopf's sync handlers) capped a thousand FineTuneJobs' creates at 6 requests in flight (measured:
#: N = 200, p99 create → Job 27 s).
MAX_IN_FLIGHT = 32

_client: ApiClient | None = None
_executor: concurrent.futures.ThreadPoolExecutor | None = None


class UndeclaredPermission(RuntimeError):
    """A call the operator makes is missing from REQUIRED_PERMISSIONS (a bug: the chart would lack it)."""


def connect(config_file: str | None = None) -> None:
    """Open the client: in-cluster credentials in a pod, else the kubeconfig (``KUBECONFIG`` or ~/.kube/config)."""
    global _client, _executor
    close()
    configuration = type.__call__(kubernetes.client.Configuration)  # not a copy of the process-wide default
    if config_file is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        kubernetes.config.load_kube_config(config_file=config_file, client_configuration=configuration)
    configuration.connection_pool_maxsize = MAX_IN_FLIGHT
    _client = ApiClient(configuration)
    _client.user_agent = USER_AGENT
    _executor = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT, thread_name_prefix="kubeapi")


def close() -> None:
    global _client, _executor
    if _client is not None:
        _client.close()
        _client = None
    if _executor is not None:
        _executor.shutdown(wait=False)
        _executor = None


def _api() -> ApiClient:
    if _client is None:
        connect()
    assert _client is not None
    return _client


def is_declared(group: str, resource: str, verb: str) -> bool:
    return any(g == group and r == resource and verb in verbs for g, r, verbs in REQUIRED_PERMISSIONS)


def _path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> tuple[str, str]:
    group, version, plural = RESOURCES[kind]
    parts = [f"/api/{version}" if not group else f"/apis/{group}/{version}"]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name is not None:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts), f"{plural}/{subresource}" if subresource else plural


def _call_sync(method: str, path: str, body: Any, query: dict[str, Any] | None, content_type: str) -> Any:
    client = _api()
    serialized = client.param_serialize(
        method,
        path,
        query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = client.call_api(*serialized)
    response.read()
    return client.response_deserialize(response, {"2XX": "object"}).data


async def _request(
    verb: str,
    kind: str,
    namespace: str | None,
    name: str | None = None,
    *,
    subresource: str | None = None,
    body: Any = None,
    query: dict[str, Any] | None = None,
    content_type: str = "application/json",
) -> Any:
    group = RESOURCES[kind][0]
    path, resource = _path(kind, namespace, name, subresource)
    if not is_declared(group, resource, verb):
        raise UndeclaredPermission(f"{verb} {group or 'core'}/{resource} is not in REQUIRED_PERMISSIONS")
    method = {"get": "GET", "list": "GET", "create": "POST", "patch": "PATCH", "delete": "DELETE"}[verb]
    try:  # the first try without tenacity's machinery (a retry loop per request was ~5% of the CPU)
        return await _attempt(verb, resource, method, path, body, query, content_type)
    except Exception as exc:
        if not is_retryable_request(exc):
            raise
        logger.debug("retrying %s %s after %s", verb, path, exc)
        first_wait = max(_first_wait(), retry_after(exc) or 0.0)
    backoff = tenacity.wait_random_exponential(multiplier=RETRY_WAIT_MIN, min=RETRY_WAIT_MIN, max=RETRY_WAIT_MAX)
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(is_retryable_request),
        wait=lambda state: max(float(backoff(state)), retry_after(state.outcome.exception() if state.outcome else None) or 0.0),
        stop=tenacity.stop_after_attempt(RETRY_ATTEMPTS - 1),  # the first try was made above
        before_sleep=lambda state: logger.debug("retrying %s %s after %s", verb, path, state.outcome and state.outcome.exception()),
        reraise=True,
    )
    await asyncio.sleep(first_wait)
    async for attempt in retrying:
        with attempt:
            return await _attempt(verb, resource, method, path, body, query, content_type)
    raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover


def retry_after(exc: BaseException | None) -> float | None:
    """The seconds a 429/503 answer's ``Retry-After`` header asks for (capped at
    :data:`RETRY_AFTER_MAX`), or None when it names none: the server knows its load better than
    our backoff does, and a client that comes back sooner is only refused again."""
    headers = getattr(exc, "headers", None) if isinstance(exc, ApiException) else None
    value = headers.get("Retry-After") if headers else None
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_MAX) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from the API server (it sends seconds); our backoff applies


def _first_wait() -> float:
    """The jittered wait after the first failed try (the tenacity loop's waits follow it)."""
    return random.uniform(RETRY_WAIT_MIN, 2 * RETRY_WAIT_MIN)


async def _attempt(verb: str, resource: str, method: str, path: str, body: Any, query: dict[str, Any] | None,
                   content_type: str) -> Any:
    try:
        _api()  # connects (and makes the executor) on first use
        call = functools.partial(_call_sync, method, path, body, query, content_type)
        return await asyncio.get_running_loop().run_in_executor(_executor, call)
    except ApiException as exc:
        if not (exc.status == 404 and verb in ("get", "delete")) and not (exc.status == 409 and verb == "create"):
            metrics.count_api_error(verb, resource, int(exc.status or 0))
        raise
    except Exception:
        metrics.count_api_error(verb, resource, 0)
        raise


def is_retryable_request(exc: BaseException) -> bool:
    """Whether a failed request is worth repeating as it is, here (see the module docstring);
    :func:`is_transient` is the wider test for a whole decision that re-reads first (``retrying``)."""
    if isinstance(exc, ApiException):
        return int(exc.status or 0) in TRANSIENT_STATUSES
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


# ------------------------------------------------------------------------------------ verbs


async def get(kind: str, namespace: str | None, name: str, *, subresource: str | None = None) -> dict[str, Any] | None:
    """The object, or None when it does not exist."""
    try:
        found: dict[str, Any] = await _request("get", kind, namespace, name, subresource=subresource)
        return found
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def create(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create ``body``; returns (object, True), or (the existing object, False) when it is already there."""
    meta = body["metadata"]
    namespace = meta.get("namespace")
    try:
        return await _request("create", body["kind"], namespace, body=body), True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = await get(body["kind"], namespace, meta["name"])
    if existing is None:  # deleted between the two calls: let the caller's retry create it
        raise ApiException(status=409, reason=f"{body['kind']} {meta['name']} is being replaced")
    return existing, False


async def patch(
    kind: str,
    namespace: str | None,
    name: str,
    body: dict[str, Any],
    *,
    subresource: str | None = None,
) -> dict[str, Any] | None:
    """Merge-patch the object (or its status); None when it does not exist. A 409 (stale
    ``metadata.resourceVersion`` in the patch) is raised for the caller to re-read and retry."""
    try:
        patched: dict[str, Any] = await _request("patch", kind, namespace, name, subresource=subresource, body=body,
                                                 content_type=MERGE_PATCH)
        return patched
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def list_objects(kind: str, namespace: str | None, *, label_selector: str | None = None) -> list[dict[str, Any]]:
    answer = await _request("list", kind, namespace, query={"labelSelector": label_selector})
    return list(answer.get("items") or [])


async def post_event(
    involved: dict[str, Any],
    *,
    reason: str,
    message: str,
    type: str = "Normal",
) -> None:
    """Record an Event on ``involved`` (a body with apiVersion, kind and metadata). Best effort: an
    Event that cannot be written is logged, never a reason to fail a reconcile."""
    meta = involved.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'kubetune')}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": namespace,
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type,
        "source": {"component": EVENT_SOURCE},
        "reportingComponent": EVENT_SOURCE,
        "reportingInstance": os.environ.get("HOSTNAME", EVENT_SOURCE),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await _request("create", "Event", namespace, body=event)
    except Exception as exc:  # noqa: BLE001 — an Event is never worth failing the reconcile for
        logger.warning("could not post event %s on %s/%s: %s", reason, namespace, meta.get("name"), exc)


_TRANSIENT_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request can succeed when tried again (after re-reading): conflicts,
    throttling, server errors and broken connections; not 403/404/422 or our own bugs."""
    if isinstance(exc, ApiException):
        return int(exc.status or 0) in _TRANSIENT_STATUSES or not exc.status  # no status: the connection failed
    return isinstance(exc, (ConnectionError, TimeoutError, urllib3.exceptions.HTTPError))


def describe_failure(exc: BaseException) -> str:
    """One line for a failed request: the HTTP status and reason, or the connection error."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}".strip() if exc.status else f"no answer ({exc.reason})"
    return f"{type(exc).__name__}: {exc}"[:300]


def is_connected() -> bool:
    return _client is not None
