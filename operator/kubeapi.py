"""The one module of the operator that talks to the Kubernetes API.

Handlers and their helpers (``creating``, ``statusing``, ``suspending``) call these coroutines;
nothing else in ``kubetune.operator`` opens a connection (kopf's own watching aside). Requests go
through ONE shared aiohttp session per event loop (aiohttp is kopf's own HTTP client), with raw
JSON dicts in and out, at most :data:`MAX_IN_FLIGHT` requests at once (the connector's limit),
closed at operator cleanup. Why not the official ``kubernetes`` client, as before: it is
synchronous (urllib3), so every request in flight held a worker thread, and its imports and model
(de)serialisation were a large share of the operator's memory and CPU; the handful of verbs below
need only a URL, a JSON body and the credentials.

Credentials (:func:`login`, which is also the operator's ``@kopf.on.login`` handler, so kopf's
watches and this gateway authenticate the same way): kopf's public ``login_with_service_account``
(in a pod) and ``login_with_kubeconfig`` (``KUBECONFIG`` or ``~/.kube/config``; tried first when
``KUBECONFIG`` is set), turned into a session by ``kopf.ConnectionInfo``'s own
``as_ssl_context()`` (CA, client certificate and key from paths or data, ``insecure``) and
``as_http_headers()`` (bearer token or basic auth). A kubeconfig those parsers cannot use — a user
with no token, certificate or password (an ``exec`` plugin as on EKS/GKE, ``tokenFile``), or a
file they fail on — falls back to ``kopf.login_via_client``, the official client's loader, imported
only then and logged as such. A 401 makes the gateway read the credentials again once (a rotated
service-account token) and repeat the request.

The answers every caller would otherwise have to special-case are folded in here: :func:`create`
treats 409 AlreadyExists as "already there" and returns the existing object, :func:`get` and
:func:`delete` treat 404 as "absent". Every failed request is counted in
``kubetune.operator.metrics``; a failed answer is raised as :class:`ApiError` (status, reason,
headers, the server's ``Status`` body), whose text — what logs, Events and conditions show — leaves
out a 422's message, which quotes the refused values of the object (:func:`refusal_text`).

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
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import weakref
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
import tenacity

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.operator import decoding, metrics

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

#: Requests in flight at once, per event loop (the connector's limit; more wait for a connection).
#: The old thread-pool client needed this many threads; here it is only sockets.
MAX_IN_FLIGHT = 32
#: Seconds a request may wait to connect, or for the next bytes of its answer, before it fails as a
#: timeout (``running.configure`` sets it from ``KUBETUNE_REQUEST_TIMEOUT``).
REQUEST_TIMEOUT = 60.0


class UndeclaredPermission(RuntimeError):
    """A call the operator makes is missing from REQUIRED_PERMISSIONS (a bug: the chart would lack it)."""


class ApiError(Exception):
    """The API server answered with an error: ``status`` (0 when it never answered), ``reason``,
    the answer's ``headers`` and its ``Status`` body (``message``, ``details``) when it sent one."""

    def __init__(self, status: int, reason: str = "", *, headers: Mapping[str, str] | None = None,
                 body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers: Mapping[str, str] = headers or {}
        self.body = body or {}
        super().__init__(refusal_text(status, reason, self.body))


def refusal_text(status: int, reason: str, body: Mapping[str, Any]) -> str:
    """One line for an error answer, as logged and shown: the status, the reason and the server's
    message, except for a 422, whose message quotes the refused values of the object (``Invalid
    value: "…"``): of a 422 only its causes' field paths and reasons are kept."""
    head = f"{status} {reason}".strip()
    if status == 422:
        causes = (body.get("details") or {}).get("causes") or []
        fields = "; ".join(f"{c.get('field') or '?'}: {c.get('reason') or 'invalid'}" for c in causes if isinstance(c, dict))
        return head + (f" ({fields})" if fields else "")
    message = str(body.get("message") or "")[:512]
    return head + (f": {message}" if message else "")


# ------------------------------------------------------------------------------------ credentials

_info: kopf.ConnectionInfo | None = None
_headers: dict[str, str] = {}
#: One session per event loop (kopf's loop in production; each test's loop in tests): an aiohttp
#: session belongs to the loop it was made in.
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[tuple[Any, ...], aiohttp.ClientSession]] = \
    weakref.WeakKeyDictionary()


def _authenticates(info: kopf.ConnectionInfo) -> bool:
    return bool(info.token or info.scheme or (info.username and info.password)
                or info.certificate_path or info.certificate_data)


def in_cluster_address(info: kopf.ConnectionInfo) -> kopf.ConnectionInfo:
    """The API server's address in a pod as client-go and the official client take it: the
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` the kubelet sets, so no cluster DNS lookup is needed (kopf's
    reader names ``kubernetes.default.svc``, kept when the variables are absent). The server's
    certificate carries the Service's IP, so TLS verification is unchanged."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return info
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return dataclasses.replace(info, server=f"https://{host}:{port}")


def read_credentials(*, settings: kopf.OperatorSettings | None = None, logger: Any = logger,
                     **_: Any) -> kopf.ConnectionInfo:
    """The credentials of the cluster (see the module docstring for the order and the fallback)."""
    settings = settings if settings is not None else kopf.OperatorSettings()
    readers = [kopf.login_with_service_account, kopf.login_with_kubeconfig]
    if os.environ.get("KUBECONFIG"):  # named explicitly: it wins over a pod's service account, as in kubectl
        readers.reverse()
    reason = "neither a service account nor a kubeconfig was found"
    for reader in readers:
        try:
            info = reader(settings=settings, logger=logger)
        except Exception as exc:  # noqa: BLE001 — any parse failure: the official loader may still cope
            reason = f"kopf's {reader.__name__} failed ({type(exc).__name__}: {exc})"
            break
        if info is None:
            continue
        if _authenticates(info):
            return in_cluster_address(info) if reader is kopf.login_with_service_account else info
        reason = f"the credentials of {reader.__name__} carry no token, certificate or password (an exec plugin?)"
        break
    logger.info("kubetune API gateway: %s; logging in through the kubernetes client library instead", reason)
    info = kopf.login_via_client(settings=settings, logger=logger)
    if info is None:
        raise kopf.LoginError(f"cannot log in to the cluster: {reason}, and the kubernetes client is not installed")
    return info


def login(**kwargs: Any) -> kopf.ConnectionInfo:
    """The operator's ``@kopf.on.login`` handler: read the credentials, use them here, give them to kopf."""
    info = read_credentials(**kwargs)
    use(info)
    return info


def use(info: kopf.ConnectionInfo) -> None:
    """Send the gateway's requests with ``info`` (kopf's own connection info)."""
    global _info, _headers
    _info = info
    _headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **info.as_http_headers()}


def connect() -> None:
    """Read the credentials now (the gateway would on its first request); used outside kopf."""
    login()


def _tls_key(info: kopf.ConnectionInfo) -> tuple[Any, ...]:
    """What a session is built from besides the headers: a change (new certificates) makes a new one."""
    return (info.server, info.ca_path, info.ca_data, info.insecure, info.certificate_path, info.certificate_data,
            info.private_key_path, info.private_key_data, info.proxy_url, info.trust_env, MAX_IN_FLIGHT, REQUEST_TIMEOUT)


def _session() -> tuple[aiohttp.ClientSession, str]:
    if _info is None:
        login()
    info = _info
    assert info is not None
    loop = asyncio.get_running_loop()
    key = _tls_key(info)
    entry = _sessions.get(loop)
    if entry is not None and entry[0] == key and not entry[1].closed:
        return entry[1], info.server.rstrip("/")
    if entry is not None and not entry[1].closed:  # certificates changed: requests still on it fail and are retried
        loop.create_task(entry[1].close())
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, ssl=info.as_ssl_context()),
        # per request on the wire: not the wait for one of the pool's connections (a burst queues there)
        timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=REQUEST_TIMEOUT, sock_read=REQUEST_TIMEOUT),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    _sessions[loop] = (key, session)
    return session, info.server.rstrip("/")


async def aclose() -> None:
    """Close this event loop's session (operator cleanup) and forget the credentials."""
    entry = _sessions.pop(asyncio.get_running_loop(), None)
    if entry is not None:
        await entry[1].close()
    close()


def close() -> None:
    """Forget the credentials and drop every session (those of loops that are gone, too)."""
    global _info
    for _, session in list(_sessions.values()):
        connector = session.connector
        session.detach()
        if connector is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the sockets go with it
                connector._close(abort_ssl=True)  # noqa: SLF001 — close() would need that loop
    _sessions.clear()
    _info = None


def is_connected() -> bool:
    return _info is not None


async def _login_again(rejected: kopf.ConnectionInfo | None) -> None:
    """After a 401: read the credentials again, unless a request that met it too already did."""
    if _info is not rejected:
        return
    logger.info("the API server refused the credentials (401); reading them again")
    use(await asyncio.to_thread(read_credentials))


# ------------------------------------------------------------------------------------ requests


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


async def _send(method: str, path: str, body: Any, query: dict[str, Any] | None, content_type: str) -> Any:
    for attempt in range(2):
        session, server = _session()
        sent_with = _info
        headers = dict(_headers)
        data = None
        if body is not None:
            data = decoding.dumps(body)
            headers["Content-Type"] = content_type
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        async with session.request(method, server + path, params=params or None, data=data, headers=headers) as answer:
            payload = await answer.read()
            if answer.status < 400:
                return decoding.loads(payload) if payload else None
            if answer.status == 401 and attempt == 0:
                await _login_again(sent_with)
                continue
            try:
                status_body = decoding.loads(payload) if payload else None
            except ValueError:
                status_body = None
            raise ApiError(answer.status, answer.reason or "", headers=answer.headers.copy(),
                           body=status_body if isinstance(status_body, dict) else None)
    raise AssertionError("unreachable: the second 401 is raised")  # pragma: no cover


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
    headers = exc.headers if isinstance(exc, ApiError) else None
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
        return await _send(method, path, body, query, content_type)
    except ApiError as exc:
        if not (exc.status == 404 and verb in ("get", "delete")) and not (exc.status == 409 and verb == "create"):
            metrics.count_api_error(verb, resource, exc.status)
        raise
    except Exception:
        metrics.count_api_error(verb, resource, 0)
        raise


#: Failures of the connection itself (refused, reset, cut mid-answer, timed out): worth another
#: try, except a TLS failure (an untrusted certificate stays untrusted).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError, TimeoutError)


def _connection_failed(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS) and not isinstance(exc, aiohttp.ClientSSLError)


def is_retryable_request(exc: BaseException) -> bool:
    """Whether a failed request is worth repeating as it is, here (see the module docstring);
    :func:`is_transient` is the wider test for a whole decision that re-reads first (``retrying``)."""
    if isinstance(exc, ApiError):
        return exc.status in TRANSIENT_STATUSES
    return _connection_failed(exc)


# ------------------------------------------------------------------------------------ verbs


async def get(kind: str, namespace: str | None, name: str, *, subresource: str | None = None) -> dict[str, Any] | None:
    """The object, or None when it does not exist."""
    try:
        found: dict[str, Any] = await _request("get", kind, namespace, name, subresource=subresource)
        return found
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


async def create(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create ``body``; returns (object, True), or (the existing object, False) when it is already there."""
    meta = body["metadata"]
    namespace = meta.get("namespace")
    try:
        return await _request("create", body["kind"], namespace, body=body), True
    except ApiError as exc:
        if exc.status != 409:
            raise
    existing = await get(body["kind"], namespace, meta["name"])
    if existing is None:  # deleted between the two calls: let the caller's retry create it
        raise ApiError(409, f"{body['kind']} {meta['name']} is being replaced")
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
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


async def list_objects(kind: str, namespace: str | None, *, label_selector: str | None = None) -> list[dict[str, Any]]:
    answer = await _request("list", kind, namespace, query={"labelSelector": label_selector})
    return list(answer.get("items") or [])


def event_body(involved: dict[str, Any], *, reason: str, message: str, type: str = "Normal") -> dict[str, Any]:
    """The Event the operator records on ``involved`` (a body with apiVersion, kind and metadata)."""
    meta = involved.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
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


async def post_event(
    involved: dict[str, Any],
    *,
    reason: str,
    message: str,
    type: str = "Normal",
) -> None:
    """Record an Event on ``involved`` (a body with apiVersion, kind and metadata). Best effort: an
    Event that cannot be written is logged, never a reason to fail a reconcile."""
    event = event_body(involved, reason=reason, message=message, type=type)
    namespace, meta = event["metadata"]["namespace"], involved.get("metadata", {})
    try:
        await _request("create", "Event", namespace, body=event)
    except Exception as exc:  # noqa: BLE001 — an Event is never worth failing the reconcile for
        logger.warning("could not post event %s on %s/%s: %s", reason, namespace, meta.get("name"), exc)


_TRANSIENT_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request can succeed when tried again (after re-reading): conflicts,
    throttling, server errors and broken connections; not 403/404/422 or our own bugs."""
    if isinstance(exc, ApiError):
        return exc.status in _TRANSIENT_STATUSES or not exc.status  # no status: the connection failed
    return _connection_failed(exc)


def describe_failure(exc: BaseException) -> str:
    """One line for a failed request: the HTTP status and reason, or the connection error."""
    if isinstance(exc, ApiError):
        return f"{exc.status} {exc.reason}".strip() if exc.status else f"no answer ({exc.reason})"
    return f"{type(exc).__name__}: {exc}"[:300]

