"""``kubetune.client``: submit a FineTuneJob to a cluster and follow it, from a notebook, a pipeline or
the ``kubetune submit/status/logs/wait/delete`` commands (``kubetune.following`` draws them).

    from kubetune import client

    job = client.submit("examples/lora.yaml")          # validated first, as kubetune validate does
    for update in client.follow(job.name):             # progress, checkpoints, evaluations, pod logs
        print(update.text)
    final = client.wait(job.name, timeout=3600)        # a JobState; final.succeeded
    client.delete(job.name, keep_output=True)          # the workspace claim (trained weights) stays

A :class:`Client` holds one connection; the module-level functions use a shared default one. The
connection is the official ``kubernetes`` client (already the operator's dependency), so
kubeconfig files (``KUBECONFIG`` lists too), contexts, exec plugins and in-cluster service-account
tokens behave as in kubectl. The namespace is the argument, else the manifest's, else the
kubeconfig context's, else the pod's own (in a cluster), else ``default``.

What is followed comes from two places: the FineTuneJob's status (phase, message, the trainer's
``progress``, ``checkpoints`` and the end), polled, and the log of the rank-0 trainer pod (the pod
of completion index 0; the newest one after a restart), streamed. Lines of the trainer's status
reporter in that log are left out, since the status carries the same facts; so a follow shows what
``kubetune train`` shows locally. A missing pod log (not started, no RBAC for ``pods/log``) never
stops a follow: the status alone still tells the story.

Deleting: a FineTuneJob owns its children (Job, ConfigMap, RBAC, the Service of a job of several nodes), which the garbage
collector removes with it. Its workspace claim is owned only when
``checkpointing.storage.deleteWithJob`` is true; ``keep_output=True`` then takes the FineTuneJob's
owner reference off the claim (and off the claims of a search's trials) before deleting, so the
garbage collector keeps it. A claim named by ``existingClaim`` is never owned, never deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from kubetune.api import API_VERSION, GROUP, KIND, PLURAL, TERMINAL_PHASES, VERSION, FineTuneJob, FineTuneJobStatus
from kubetune.api.statuses import Progress
from kubetune.api.validating import load_documents, validate_text

#: How the client's requests show up in API server audit logs.
USER_AGENT = "kubetune-client"
MERGE_PATCH = "application/merge-patch+json"
SERVICE_ACCOUNT_NAMESPACE = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: The trainer container of every trainer pod (``kubetune.operator.building.CONTAINER_NAME``).
TRAINER_CONTAINER = "trainer"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
DEFAULT_POLL_SECONDS = 2.0

#: A pod log line of the trainer's status reporter (``<time> <LEVEL> kubetune.trainer.reporting: …``):
#: its progress, checkpoint and end lines, which a follow shows from the status instead.
_REPORTER_LINE = re.compile(r"^\S+ \S+ (INFO|DEBUG) kubetune\.trainer\.report\w*: ")


class ClientError(Exception):
    """A request the cluster refused or could not answer, in one line (no headers, no tokens)."""


class InvalidManifest(ClientError):
    """The manifest failed validation; ``problems`` are the lines ``kubetune validate`` prints."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class JobNotFound(ClientError):
    """No FineTuneJob of that name in that namespace."""


class WaitTimeout(ClientError, TimeoutError):
    """The job did not finish within the timeout; ``state`` is the last one seen."""

    def __init__(self, message: str, state: JobState) -> None:
        super().__init__(message)
        self.state = state


@dataclasses.dataclass(frozen=True)
class JobState:
    """A FineTuneJob as last read: name, namespace, uid and its status (the api's model)."""

    name: str
    namespace: str
    uid: str
    status: FineTuneJobStatus
    body: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobState:
        meta = body.get("metadata") or {}
        return cls(name=str(meta.get("name", "")), namespace=str(meta.get("namespace", "")), uid=str(meta.get("uid", "")),
                   status=FineTuneJobStatus.model_validate(body.get("status") or {}), body=dict(body))

    @property
    def phase(self) -> str | None:
        return self.status.phase

    @property
    def finished(self) -> bool:
        return self.status.phase in TERMINAL_PHASES

    @property
    def succeeded(self) -> bool:
        return self.status.phase == "Succeeded"

    @property
    def progress(self) -> Progress | None:
        return self.status.progress

    def describe(self) -> list[str]:
        """What ``kubetune status NAME`` prints."""
        from kubetune.trainer.showing import describe_progress

        s = self.status
        lines = [f"FineTuneJob {self.namespace}/{self.name}: {s.phase or 'Pending (not seen by the operator yet)'}"
                 + (f": {s.message}" if s.message else "")]
        if s.techniques:
            lines.append(f"  techniques: {s.techniques}")
        if s.progress is not None:
            lines.append(f"  progress: {describe_progress(s.progress)}")
            if s.progress.stop_reason:
                lines.append(f"  stopped: {s.progress.stop_reason}")
        for c in s.checkpoints:
            best = " (best)" if c.path == s.best_checkpoint else ""
            lines.append(f"  checkpoint step {c.step}: {c.path}{best}")
        if s.output_path:
            lines.append(f"  output: {s.output_path}")
        if s.best_trial is not None:
            lines.append(f"  best trial: {s.best_trial.index} ({s.best_trial.metric})")
        if s.restarts:
            lines.append(f"  restarts: {s.restarts}")
        for c in s.conditions:
            lines.append(f"  condition {c.type}={c.status}" + (f" {c.reason}" if c.reason else "")
                         + (f": {c.message}" if c.message else ""))
        return lines


@dataclasses.dataclass(frozen=True)
class Update:
    """One thing that happened to a followed job.

    ``kind`` is ``phase`` (the phase or its message changed), ``progress`` (new training
    progress), ``checkpoint``, ``evaluation``, ``log`` (a line of the rank-0 pod's log, not one
    the status already carries) or ``end`` (the job finished; always the last). ``text`` is the
    line a terminal shows; ``job`` the state it came from.
    """

    kind: str
    text: str
    job: JobState


@dataclasses.dataclass(frozen=True)
class Deleted:
    """What :meth:`Client.delete` did: the claims it kept, and those that go with the job."""

    name: str
    namespace: str
    kept_claims: list[str]
    deleted_claims: list[str]


def _describe_api_error(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status is not None and hasattr(exc, "reason"):
        detail = ""
        try:
            detail = json.loads(getattr(exc, "body", None) or "{}").get("message", "")
        except (TypeError, ValueError, AttributeError):
            pass
        return f"HTTP {status} {exc.reason}" + (f": {detail[:300]}" if detail else "")
    cause = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the connection error
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


class Client:
    """One connection to a cluster. ``kubeconfig`` (default ``$KUBECONFIG`` or ~/.kube/config, else
    in-cluster credentials), ``context`` (default: the current one), ``namespace`` (see the module doc)."""

    def __init__(self, kubeconfig: str | os.PathLike[str] | None = None, *, context: str | None = None,
                 namespace: str | None = None) -> None:
        import kubernetes

        configuration = kubernetes.client.Configuration()
        source = str(kubeconfig) if kubeconfig is not None else os.environ.get("KUBECONFIG") or "~/.kube/config"
        files = [os.path.expanduser(p) for p in source.split(os.pathsep) if p]
        context_namespace: str | None = None
        if kubeconfig is None and not any(os.path.exists(p) for p in files) and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            try:
                context_namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
            except OSError:
                context_namespace = None
        else:
            joined = os.pathsep.join(files)
            try:
                kubernetes.config.load_kube_config(config_file=joined, context=context,
                                                   client_configuration=configuration, persist_config=False)
                _, active = kubernetes.config.list_kube_config_contexts(config_file=joined)
            except (kubernetes.config.ConfigException, OSError) as exc:
                raise ClientError(f"cannot use kubeconfig {source}: {exc}") from None
            if context is not None:
                contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=joined)
                active = next((c for c in contexts if c.get("name") == context), active)
            context_namespace = ((active or {}).get("context") or {}).get("namespace")
        configuration.retries = 1
        self._api = kubernetes.client.ApiClient(configuration)
        self._api.user_agent = USER_AGENT
        self._exception = kubernetes.client.ApiException
        self.namespace = namespace or context_namespace or "default"

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, body: Any = None, query: Mapping[str, Any] | None = None,
                 content_type: str = "application/json", stream: bool = False, timeout: float | None = 30.0) -> Any:
        serialized = self._api.param_serialize(
            method, path, query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params={"Content-Type": content_type, "Accept": "application/json, */*"},
            body=body, auth_settings=["BearerToken"])
        try:
            response = self._api.call_api(*serialized, _request_timeout=None if stream else timeout)
            if stream:
                if not 200 <= response.status <= 299:
                    response.read()
                    raise self._exception(http_resp=response)
                return response.response
            response.read()
            if not 200 <= response.status <= 299:
                raise self._exception(http_resp=response)
            return json.loads(response.data or b"null")
        except self._exception:
            raise
        except Exception as exc:  # noqa: BLE001 - urllib3's connection errors, in one line
            raise ClientError(f"{method} {path}: {_describe_api_error(exc)}") from None

    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    def _ftj_path(self, namespace: str, name: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        return f"{path}/{name}" if name else path

    def _error(self, exc: Any, what: str) -> ClientError:
        return ClientError(f"{what}: {_describe_api_error(exc)}")

    # ------------------------------------------------------------------ submit / get

    def submit(self, manifest: str | os.PathLike[str] | Mapping[str, Any] | FineTuneJob, *,
               namespace: str | None = None) -> JobState:
        """Validate ``manifest`` (a file path, ``-`` for stdin, a dict or a FineTuneJob) exactly as
        ``kubetune validate`` does and create it; raises :class:`InvalidManifest` with the problem
        lines, or :class:`ClientError` (e.g. when a FineTuneJob of that name exists already)."""
        [state] = self.submit_all(manifest, namespace=namespace, allow_many=False)
        return state

    def submit_all(self, manifest: str | os.PathLike[str] | Mapping[str, Any] | FineTuneJob | list[Any], *,
                   namespace: str | None = None, allow_many: bool = True) -> list[JobState]:
        """Like :meth:`submit`, for a file of several FineTuneJobs: all are validated before any is created."""
        bodies = _manifests(manifest)
        if not allow_many and len(bodies) != 1:
            raise InvalidManifest([f"{_display_name(manifest)}: holds {len(bodies)} FineTuneJobs; submit one at a time"])
        created = []
        for body in bodies:
            meta = dict(body.get("metadata") or {})
            wanted = namespace or meta.get("namespace") or self.namespace
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise InvalidManifest([f"{_display_name(manifest)}: metadata.namespace is {meta['namespace']!r}, "
                                       f"but the namespace given is {namespace!r}"])
            body = {**body, "metadata": {**meta, "namespace": wanted}}
            try:
                answer = self._request("POST", self._ftj_path(wanted), body=body)
            except self._exception as exc:
                if exc.status == 409:
                    raise ClientError(f"FineTuneJob {wanted}/{meta.get('name')} exists already: "
                                      f"kubetune delete {meta.get('name')} first, or give the job another name") from None
                raise self._error(exc, f"cannot create FineTuneJob {wanted}/{meta.get('name')}") from None
            created.append(JobState.from_body(answer))
        return created

    def get(self, name: str, *, namespace: str | None = None) -> JobState:
        """The FineTuneJob as it is now; :class:`JobNotFound` when there is none."""
        ns = self._ns(namespace)
        try:
            return JobState.from_body(self._request("GET", self._ftj_path(ns, name)))
        except self._exception as exc:
            if exc.status == 404:
                raise JobNotFound(f"no FineTuneJob {name} in namespace {ns}") from None
            raise self._error(exc, f"cannot read FineTuneJob {ns}/{name}") from None

    # ------------------------------------------------------------------ waiting and following

    def wait(self, name: str, *, namespace: str | None = None, timeout: float | None = None,
             poll: float = DEFAULT_POLL_SECONDS) -> JobState:
        """Block until the job is Succeeded or Failed and return its state (check ``.succeeded``);
        :class:`WaitTimeout` after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.get(name, namespace=namespace)
            if state.finished:
                return state
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"FineTuneJob {state.namespace}/{name} is still {state.phase or 'Pending'} "
                                  f"after {timeout:g}s", state)
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def follow(self, name: str, *, namespace: str | None = None, logs: bool = True, poll: float = DEFAULT_POLL_SECONDS,
               timeout: float | None = None) -> Iterator[Update]:
        """:class:`Update` s of the job until it finishes (the last is ``end``); see the module doc.

        ``logs``: also the rank-0 pod's log lines. ``timeout``: :class:`WaitTimeout` after that many
        seconds. Breaking out of the loop stops following (the job runs on)."""
        ns = self._ns(namespace)
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = _Seen()
        tail = _PodLogTail(self, ns, name) if logs else None
        try:
            while True:
                state = self.get(name, namespace=ns)
                if tail is not None:
                    tail.poll()
                    for line in tail.drain():
                        yield Update("log", line, state)
                yield from seen.updates(state)
                if state.finished:
                    if tail is not None:
                        tail.finish(timeout=5.0)
                        for line in tail.drain():
                            yield Update("log", line, state)
                    yield Update("end", _end_line(state), state)
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(f"FineTuneJob {ns}/{name} is still {state.phase or 'Pending'} after {timeout:g}s", state)
                time.sleep(poll)
        finally:
            if tail is not None:
                tail.close()

    # ------------------------------------------------------------------ logs

    def rank0_pod(self, name: str, *, namespace: str | None = None) -> dict[str, Any] | None:
        """The newest trainer pod of completion index 0 of the job, or None."""
        from kubetune.operator import naming

        ns = self._ns(namespace)
        selector = ",".join(f"{k}={v}" for k, v in naming.selector_labels(name).items())
        try:
            pods = self._request("GET", f"/api/v1/namespaces/{ns}/pods", query={"labelSelector": selector})["items"]
        except self._exception as exc:
            raise self._error(exc, f"cannot list the pods of FineTuneJob {ns}/{name}") from None

        def index(pod: dict[str, Any]) -> str | None:
            meta = pod.get("metadata") or {}
            return (meta.get("labels") or {}).get(COMPLETION_INDEX) or (meta.get("annotations") or {}).get(COMPLETION_INDEX)

        mine = [p for p in pods if index(p) == "0"
                and (p["metadata"].get("annotations") or {}).get(f"{GROUP}/job-name", name) == name]
        mine.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", int(p["metadata"].get("resourceVersion") or 0)))
        return mine[-1] if mine else None

    def logs(self, name: str, *, namespace: str | None = None, follow: bool = False,
             tail_lines: int | None = None) -> Iterator[str]:
        """The rank-0 trainer pod's log, line by line; with ``follow``, until the container ends."""
        ns = self._ns(namespace)
        pod = self.rank0_pod(name, namespace=ns)
        if pod is None:
            self.get(name, namespace=ns)  # JobNotFound first, when that is the reason
            raise ClientError(f"FineTuneJob {ns}/{name} has no trainer pod (yet)")
        yield from self._pod_log(ns, pod["metadata"]["name"], follow=follow, tail_lines=tail_lines)

    def _pod_log(self, namespace: str, pod: str, *, follow: bool, tail_lines: int | None = None) -> Iterator[str]:
        query = {"container": TRAINER_CONTAINER, "follow": "true" if follow else None, "tailLines": tail_lines}
        try:
            response = self._request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", query=query, stream=True)
        except self._exception as exc:
            raise self._error(exc, f"cannot read the log of pod {namespace}/{pod}") from None
        try:
            pending = b""
            for chunk in response.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace").rstrip("\r")
            if pending:
                yield pending.decode("utf-8", errors="replace")
        finally:
            response.release_conn()

    # ------------------------------------------------------------------ delete

    def delete(self, name: str, *, namespace: str | None = None, keep_output: bool = False) -> Deleted:
        """Delete the FineTuneJob (its children go with it); see the module doc for its claim."""
        ns = self._ns(namespace)
        state = self.get(name, namespace=ns)
        kept: list[str] = []
        deleted: list[str] = []
        for job_name, uid in [(state.name, state.uid), *self._trials(ns, state.uid)]:
            claim = self._workspace_claim(ns, job_name)
            if claim is None:
                continue
            meta = claim["metadata"]
            owned = [ref for ref in meta.get("ownerReferences") or [] if ref.get("uid") == uid]
            if owned and keep_output:
                others = [ref for ref in meta["ownerReferences"] if ref.get("uid") != uid]
                patch = {"metadata": {"ownerReferences": others or None, "resourceVersion": meta.get("resourceVersion")}}
                try:
                    self._request("PATCH", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{meta['name']}",
                                  body=patch, content_type=MERGE_PATCH)
                except self._exception as exc:
                    raise self._error(exc, f"cannot keep claim {meta['name']} (nothing was deleted)") from None
            (deleted if owned and not keep_output else kept).append(meta["name"])
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self._request("DELETE", self._ftj_path(ns, name), body=body)
        except self._exception as exc:
            if exc.status == 404:
                raise JobNotFound(f"no FineTuneJob {name} in namespace {ns}") from None
            raise self._error(exc, f"cannot delete FineTuneJob {ns}/{name}") from None
        return Deleted(name=name, namespace=ns, kept_claims=kept, deleted_claims=deleted)

    def _trials(self, namespace: str, uid: str) -> list[tuple[str, str]]:
        """(name, uid) of the FineTuneJobs this one owns (a search's trials)."""
        try:
            items = self._request("GET", self._ftj_path(namespace))["items"]
        except self._exception:
            return []
        return [(t["metadata"]["name"], t["metadata"].get("uid", "")) for t in items
                if any(ref.get("uid") == uid for ref in t["metadata"].get("ownerReferences") or [])]

    def _workspace_claim(self, namespace: str, job_name: str) -> dict[str, Any] | None:
        from kubetune.operator import naming

        claim = naming.names_for(job_name).claim
        try:
            return self._request("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        except self._exception as exc:
            if exc.status == 404:
                return None
            raise self._error(exc, f"cannot read claim {namespace}/{claim}") from None


# ---------------------------------------------------------------------- following, in parts


class _Seen:
    """What a follower has shown already, so that each poll yields only what is new."""

    def __init__(self) -> None:
        self.phase: tuple[str | None, str | None] | None = None
        self.progress: tuple[Any, ...] | None = None
        self.checkpoints: set[tuple[int, str]] = set()
        self.evaluation: tuple[Any, ...] | None = None

    def updates(self, state: JobState) -> Iterator[Update]:
        from kubetune.trainer.showing import describe_progress

        s = state.status
        phase = (s.phase, s.message)
        if phase != self.phase and s.phase not in TERMINAL_PHASES:
            self.phase = phase
            yield Update("phase", f"{state.name}: {s.phase or 'Pending'}" + (f": {s.message}" if s.message else ""), state)
        for c in sorted(s.checkpoints, key=lambda c: c.step):
            if (c.step, c.path) not in self.checkpoints:
                self.checkpoints.add((c.step, c.path))
                best = " (best so far)" if c.path == s.best_checkpoint else ""
                yield Update("checkpoint", f"checkpoint at step {c.step}: {c.path}{best}", state)
        p = s.progress
        if p is None:
            return
        evaluation = (p.eval_loss, tuple(sorted((p.metrics or {}).items())))
        if (p.eval_loss is not None or p.metrics) and evaluation != self.evaluation:
            self.evaluation = evaluation
            shown = {"eval_loss": p.eval_loss} if p.eval_loss is not None else {}
            shown.update(p.metrics or {})
            yield Update("evaluation", "evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()), state)
        key = (p.step, p.total_steps, p.updated_at, p.loss)
        if key != self.progress:
            self.progress = key
            yield Update("progress", describe_progress(p), state)


def _end_line(state: JobState) -> str:
    s = state.status
    if state.succeeded:
        reason = (s.progress.stop_reason if s.progress else None) or "completed"
        return f"training ended ({reason})" + (f"; output in {s.output_path}" if s.output_path else "")
    return f"{state.name}: {s.phase}" + (f": {s.message}" if s.message else "")


class _PodLogTail:
    """Streams the rank-0 pod's log in a thread; a new pod (a restart) gets a new stream."""

    def __init__(self, client: Client, namespace: str, name: str) -> None:
        self.client, self.namespace, self.name = client, namespace, name
        self.lines: queue.Queue[str] = queue.Queue()
        self.pod: str | None = None
        self.thread: threading.Thread | None = None
        self.disabled = False
        self._stop = threading.Event()

    def poll(self) -> None:
        if self.disabled or (self.thread is not None and self.thread.is_alive()):
            return
        try:
            pod = self.client.rank0_pod(self.name, namespace=self.namespace)
        except ClientError as exc:
            self._give_up(str(exc))
            return
        if pod is None or pod["metadata"]["name"] == self.pod:
            return
        if (pod.get("status") or {}).get("phase") not in ("Running", "Succeeded", "Failed"):
            return  # no log before the container starts
        self.pod = pod["metadata"]["name"]
        self.thread = threading.Thread(target=self._read, args=(self.pod,), name="kubetune-pod-log", daemon=True)
        self.thread.start()

    def _read(self, pod: str) -> None:
        try:
            for line in self.client._pod_log(self.namespace, pod, follow=True):
                if self._stop.is_set():
                    return
                if line and not _REPORTER_LINE.match(line):
                    self.lines.put(line)
        except ClientError as exc:
            self._give_up(str(exc))

    def _give_up(self, why: str) -> None:
        if not self.disabled:
            self.disabled = True
            self.lines.put(f"(no pod log: {why})")

    def drain(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out

    def finish(self, timeout: float) -> None:
        """At the end: read the last pod's log to its end (or for ``timeout`` seconds)."""
        if self.thread is None and not self.disabled:
            self.poll()
        if self.thread is not None:
            self.thread.join(timeout)

    def close(self) -> None:
        self._stop.set()


def read_manifests(manifest: str | os.PathLike[str] | Mapping[str, Any] | FineTuneJob | list[Any]) -> list[dict[str, Any]]:
    """The FineTuneJob bodies of a file (``-``: stdin), a dict or a FineTuneJob, validated as
    ``kubetune validate`` does; InvalidManifest with its lines. Needs no cluster."""
    return _manifests(manifest)


def _manifests(manifest: str | os.PathLike[str] | Mapping[str, Any] | FineTuneJob | list[Any]) -> list[dict[str, Any]]:
    """The FineTuneJob bodies to create, validated; InvalidManifest with ``kubetune validate``'s lines."""
    if isinstance(manifest, FineTuneJob):
        return [manifest.model_dump(mode="json", by_alias=True, exclude_none=True)]
    if isinstance(manifest, list):  # bodies read before (kubetune submit reads the file before it connects)
        return [body for item in manifest for body in _manifests(item)]
    if isinstance(manifest, Mapping):
        from kubetune.api.validating import validate_manifest

        job, problems = validate_manifest(dict(manifest))
        if job is None:
            raise InvalidManifest([str(p) for p in problems])
        return [dict(manifest)]
    path = os.fspath(manifest)
    name = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidManifest([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise InvalidManifest([f"{name}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    from kubetune.api.problems import SpecError

    try:
        jobs, problems = validate_text(text, name)
        bodies = [doc.body for doc in load_documents(text, name)]
    except SpecError as exc:  # YAML syntax: the path already names the file, line and column
        raise InvalidManifest([str(p) if p.path.startswith(name) else f"{name}: {p}" for p in exc.problems]) from None
    if problems:
        raise InvalidManifest([f"{name}: {p}" for p in problems])
    return bodies


def _display_name(manifest: object) -> str:
    if isinstance(manifest, (str, os.PathLike)):
        return "<stdin>" if os.fspath(manifest) == "-" else os.fspath(manifest)
    return "manifest"


# ---------------------------------------------------------------------- module-level API

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The shared :class:`Client` of the module-level functions (current kubeconfig context)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def submit(manifest: str | os.PathLike[str] | Mapping[str, Any] | FineTuneJob, *, namespace: str | None = None) -> JobState:
    return default_client().submit(manifest, namespace=namespace)


def get(name: str, *, namespace: str | None = None) -> JobState:
    return default_client().get(name, namespace=namespace)


def wait(name: str, *, namespace: str | None = None, timeout: float | None = None,
         poll: float = DEFAULT_POLL_SECONDS) -> JobState:
    return default_client().wait(name, namespace=namespace, timeout=timeout, poll=poll)


def follow(name: str, *, namespace: str | None = None, logs: bool = True, poll: float = DEFAULT_POLL_SECONDS,
           timeout: float | None = None) -> Iterator[Update]:
    return default_client().follow(name, namespace=namespace, logs=logs, poll=poll, timeout=timeout)


def logs(name: str, *, namespace: str | None = None, follow: bool = False) -> Iterator[str]:
    return default_client().logs(name, namespace=namespace, follow=follow)


def delete(name: str, *, namespace: str | None = None, keep_output: bool = False) -> Deleted:
    return default_client().delete(name, namespace=namespace, keep_output=keep_output)


__all__ = [
    "API_VERSION", "KIND", "Client", "ClientError", "Deleted", "InvalidManifest", "JobNotFound", "JobState",
    "Update", "WaitTimeout", "default_client", "delete", "follow", "get", "logs", "submit", "wait",
]
