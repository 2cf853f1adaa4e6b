"""A one-node cluster for the emulator: the Job controller and a kubelet that run pods as local processes.

The end-to-end training tests (``tests/e2e/test_training_flows.py``) run the real operator against
the API server emulator (``tests.support.emulating``), which has no controllers and no nodes.
:class:`LocalNode` plays both, from what is in the API and nothing else:

* **Job controller** — for every batch/v1 Job in the namespace: one pod per missing completion index (labels and annotations of the template, the
  completion index, ``spec.hostname`` ``<job>-<index>``, owned by the Job, the
  ``batch.kubernetes.io/job-tracking`` finalizer); a failed pod counts against ``backoffLimit``
  and is replaced, unless ``podFailurePolicy`` says otherwise; ``spec.suspend`` deletes the active
  pods (not counted as failures) and sets the ``Suspended`` condition, unsuspending sets it False
  and starts pods again; the Job status (active, ready, terminating, failed, succeeded,
  startTime, completionTime, conditions ``Complete``/``Failed``) as the real controller writes it.
* **kubelet** — a pod's init containers run one after another, then its container, each as a subprocess: the command and args of the template with
  ``$(VAR)`` expanded, the environment resolved (values, downward API ``fieldRef``, ConfigMap and
  Secret keys), the volumes materialised (ConfigMap keys as files, each claim as one folder that
  outlives pods, emptyDirs per pod). Pod status follows the process: Running while it lives, then
  Succeeded/Failed with the exit code (Pending with ``initContainerStatuses`` while an init container
  runs; an init container's non-zero exit fails the pod, the main container never starts), ``reason`` and the termination message (the file at
  ``terminationMessagePath``, else with ``FallbackToLogsOnError`` the log tail: 80 lines / 2 KiB).
  Deleting a pod sends SIGTERM to its main process and SIGKILL to the whole container after
  ``terminationGracePeriodSeconds``; :meth:`LocalNode.kill` is a fault from outside (the OOM
  killer, a node failure).

What a container sees and the host cannot give it is mapped explicitly, nothing more:

* its filesystem: each pod index has a root folder (``<root>/rootfs/<namespace>/<hostname>``) in
  which every volume mount and every ``image_files`` path (what the trainer image ships, e.g. the
  examples at ``/opt/kubetune/examples``) is a symlink at its container path. Only the variables in
  :data:`PATH_VARIABLES` and command-line arguments that are absolute paths under a volume mount
  are rewritten into that root. So what the trainer reports (checkpoint paths) is a host path
  under the root, where a real pod would report ``/workspace/...``; the root of an index is the
  same for every pod of it, so paths stay comparable across restarts;
* cluster DNS: the variables in :data:`HOST_VARIABLES` (``MASTER_ADDR``) that name a pod through a
  headless Service (``<hostname>.<subdomain>``: the Service exists, and a live pod has that
  hostname and subdomain) become ``127.0.0.1``;
* the image: the commands in :data:`IMAGE_COMMANDS` are this interpreter's; :data:`IMAGE_ENV` is
  what the image sets; ``KUBECONFIG`` stands in for the mounted service-account token (the emulator
  does no RBAC).

Not played: scheduling and resources, image pulls, probes, restartPolicy other than Never,
readOnly mounts, subPath expressions, the Job controller's backoff delay (replacements start
at once) and ``backoffLimitPerIndex``/``successPolicy``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import ApiException

from tests.support.clusters import Cluster

#: Commands of the trainer image, and what runs them here.
IMAGE_COMMANDS = {"python": sys.executable, "torchrun": str(Path(sys.executable).with_name("torchrun"))}
#: What the trainer image's own environment sets (the sandbox has no network either).
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
#: Variables of the template whose value is a path in the container: rewritten into the pod's root.
PATH_VARIABLES = ("KUBETUNE_CONFIG", "KUBETUNE_OUTPUT_DIR", "KUBETUNE_CHECKPOINT_DIR", "KUBETUNE_BASE_DIR",
                  "KUBETUNE_PVC_ROOT", "KUBETUNE_FETCH_DIR", "HF_HOME", "HOME")
#: Variables of the template whose value is a host name in the cluster: resolved by :meth:`LocalNode.resolve_host`.
HOST_VARIABLES = ("MASTER_ADDR",)

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048
MESSAGE_MAX_BYTES = 4096
NODE_NAME = "local-node"
KUBELET_USER_AGENT = "kubetune-tests/local-node"

_FIELD_KEY = re.compile(r"^metadata\.(annotations|labels)\['([^']+)'\]$")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


class NodeError(RuntimeError):
    """Something in a pod the local node cannot run (an unsupported volume, a missing ConfigMap…)."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, ``$$`` is ``$``, the rest kept."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR_REF.sub(replace, text)


def field_value(pod: dict[str, Any], path: str) -> str:
    """The downward API's ``fieldRef.fieldPath`` of ``pod`` ('' for a missing annotation or label)."""
    meta = pod["metadata"]
    keyed = _FIELD_KEY.match(path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""), "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
    }
    if path not in simple:
        raise NodeError(f"fieldRef {path!r} is not supported by the local node")
    return str(simple[path])


def log_tail(text: str) -> str:
    """What FallbackToLogsOnError takes: the last 80 lines, at most the last 2 KiB of them."""
    tail = "\n".join(text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:])
    data = tail.encode()
    return data[-LOG_TAIL_BYTES:].decode(errors="replace") if len(data) > LOG_TAIL_BYTES else tail


@dataclasses.dataclass
class PodRun:
    """One pod this node ran: its process while it lives, and how it ended."""

    name: str
    namespace: str
    job: str
    job_uid: str
    index: int
    rootfs: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    termination_message_path: str
    fallback_to_logs: bool
    grace_seconds: float
    started_at: str
    container: str = "trainer"  # the container running now (an init container first, if the pod has any)
    #: Containers still to run after this one, in order (init containers, then the main one).
    remaining: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: ``initContainerStatuses`` of the init containers that ran to completion.
    init_statuses: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    volumes: dict[str, Path] = dataclasses.field(default_factory=dict)
    pod: dict[str, Any] = dataclasses.field(default_factory=dict)
    deleted: bool = False  # deleted by the Job controller (suspension, a failed Job): not a failure
    sigterm_at: float | None = None
    exit_code: int | None = None
    message: str = ""
    finished_at: str | None = None

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclasses.dataclass
class JobState:
    """What the Job controller keeps about one Job (the real one keeps it in the Job's status)."""

    failed: int = 0
    succeeded: set[int] = dataclasses.field(default_factory=set)
    conditions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    start_time: str | None = None
    completion_time: str | None = None
    suspended: bool = False
    finished: bool = False


class LocalNode:
    """The Job controller and a kubelet for one namespace (see the module doc). Use as a context manager."""

    def __init__(self, kubeconfig: Path, namespace: str, root: Path, *, image_files: dict[str, Path],
                 interval: float = 0.1) -> None:
        self.cluster = Cluster(kubeconfig, namespace=namespace)
        self.cluster.api_client.user_agent = KUBELET_USER_AGENT
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.root = root
        self.image_files = dict(image_files)
        self.interval = interval
        self.runs: list[PodRun] = []
        self._jobs: dict[str, JobState] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ test-facing

    def __enter__(self) -> LocalNode:
        self._thread = threading.Thread(target=self._loop, name="local-node", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(30)
        for run in self.runs:
            if run.alive:
                self._kill_container(run)
                run.process.wait(10)
        self.cluster.close()

    def check(self) -> None:
        """Raise what broke the node's loop, if anything did."""
        if self._failure is not None:
            raise AssertionError(f"the local node failed: {self._failure!r}") from self._failure

    def pods_of(self, job: str) -> list[PodRun]:
        with self._lock:
            return [run for run in self.runs if run.job == job]

    def kill(self, run: PodRun, sig: int = signal.SIGKILL) -> None:
        """A fault from outside the pod (the OOM killer, a node failure): signal its whole container."""
        os.killpg(run.process.pid, sig)

    def log_file(self, namespace: str, pod: str) -> Path | None:
        """The log file of a pod this node ran (for the emulator's ``pods/<name>/log``), or None.

        Called from the emulator's loop: no lock (the node's loop holds its lock while it calls the
        emulator), and ``runs`` only grows."""
        return next((run.log_path for run in list(self.runs) if run.namespace == namespace and run.name == pod), None)

    def claim_dir(self, claim: str) -> Path:
        """The folder backing a PersistentVolumeClaim (one per claim, it outlives pods)."""
        return self.root / "claims" / self.namespace / claim

    def host_path(self, run: PodRun, container_path: str) -> Path:
        """Where ``container_path`` of ``run``'s container is on this machine."""
        return run.rootfs / container_path.lstrip("/")

    def resolve_host(self, name: str) -> str | None:
        """Cluster DNS for ``<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]``: 127.0.0.1 when a
        headless Service ``<subdomain>`` exists and a live pod has that hostname and subdomain."""
        parts = name.split(".")
        if len(parts) < 2 or parts[2:] not in ([], [self.namespace], [self.namespace, "svc"],
                                                 [self.namespace, "svc", "cluster", "local"]):
            return None
        hostname, subdomain = parts[0], parts[1]
        service = self.cluster.find("v1", "Service", subdomain)
        if service is None or service["spec"].get("clusterIP") != "None":
            return None
        for pod in self.cluster.list("v1", "Pod"):
            spec = pod.get("spec") or {}
            if spec.get("hostname") == hostname and spec.get("subdomain") == subdomain \
                    and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                return "127.0.0.1"
        return None

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                with self._lock:
                    self._follow_deletions()
                    self._reap()
                    for job in self.cluster.list("batch/v1", "Job"):
                        self._sync_job(job)
                self._stopping.wait(self.interval)
        except BaseException as exc:  # surfaced by check() in the test's thread
            self._failure = exc

    # ------------------------------------------------------------------ Job controller

    def _sync_job(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        state = self._jobs.setdefault(meta["uid"], JobState())
        if state.finished:
            return
        active = [r for r in self.runs if r.job_uid == meta["uid"] and r.alive and not r.deleted]
        if spec.get("suspend"):
            for run in active:
                self._delete_pod(run)
            if not state.suspended:
                state.suspended = True
                self._set_condition(state, "Suspended", "True", "JobSuspended", "Job suspended")
                self._write_job_status(job, state)
            return
        if state.suspended:
            state.suspended = False
            state.start_time = now()  # the controller restarts the clock on resume
            self._set_condition(state, "Suspended", "False", "JobResumed", "Job resumed")
        state.start_time = state.start_time or now()
        busy = {r.index for r in self.runs if r.job_uid == meta["uid"] and r.alive}  # incl. terminating ones
        for index in range(int(spec.get("completions") or 1)):
            if index not in state.succeeded and index not in busy:
                self._start_pod(job, index)
        self._write_job_status(job, state)

    def _set_condition(self, state: JobState, kind: str, status: str, reason: str, message: str) -> None:
        stamp = now()
        condition = {"type": kind, "status": status, "reason": reason, "message": message,
                     "lastProbeTime": stamp, "lastTransitionTime": stamp}
        state.conditions = [c for c in state.conditions if c["type"] != kind] + [condition]

    def _write_job_status(self, job: dict[str, Any], state: JobState) -> None:
        runs = [r for r in self.runs if r.job_uid == job["metadata"]["uid"]]
        status: dict[str, Any] = {
            "active": sum(1 for r in runs if r.alive and not r.deleted),
            "ready": sum(1 for r in runs if r.alive and not r.deleted),
            "terminating": sum(1 for r in runs if r.alive and r.deleted),
            "failed": state.failed,
            "succeeded": len(state.succeeded),
            "completedIndexes": ",".join(str(i) for i in sorted(state.succeeded)),
            "startTime": state.start_time,
            "completionTime": state.completion_time,
            "conditions": state.conditions,
        }
        current = job.get("status") or {}
        if any(current.get(k) != v for k, v in status.items()):
            self.cluster.patch("batch/v1", "Job", job["metadata"]["name"], {"status": status}, subresource="status")

    def _account(self, run: PodRun) -> None:
        """The Job controller's view of a pod that ended."""
        job = self.cluster.find("batch/v1", "Job", run.job)
        state = self._jobs[run.job_uid]
        if job is None or job["metadata"]["uid"] != run.job_uid or state.finished:
            return
        spec = job["spec"]
        if run.deleted:
            pass  # deleted by the controller: not a failure
        elif run.exit_code == 0:
            state.succeeded.add(run.index)
            if len(state.succeeded) >= int(spec.get("completions") or 1):
                state.completion_time = now()
                self._set_condition(state, "Complete", "True", "", "")
                state.finished = True
        else:
            action, rule = self._pod_failure_action(spec, run)
            if action != "Ignore":
                state.failed += 1
            if action == "FailJob":
                self._fail(job, state, "PodFailurePolicy",
                           f"Container {rule[0]} for pod {run.namespace}/{run.name} failed with exit code "
                           f"{run.exit_code} matching FailJob rule at index {rule[1]}")
            elif state.failed > int(spec.get("backoffLimit", 6)):
                self._fail(job, state, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        self._write_job_status(job, state)

    def _fail(self, job: dict[str, Any], state: JobState, reason: str, message: str) -> None:
        self._set_condition(state, "FailureTarget", "True", reason, message)
        self._set_condition(state, "Failed", "True", reason, message)
        state.finished = True
        for other in self.runs:
            if other.job_uid == job["metadata"]["uid"] and other.alive:
                self._delete_pod(other)

    @staticmethod
    def _pod_failure_action(spec: dict[str, Any], run: PodRun) -> tuple[str, tuple[str, int]]:
        """The action of the first podFailurePolicy rule matching the exit code ("Count" when none does)."""
        for position, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
            codes = rule.get("onExitCodes")
            if not codes:
                continue  # onPodConditions (DisruptionTarget…) never happen on this node
            container = codes.get("containerName") or run.container
            if container != run.container:
                continue
            inside = run.exit_code in codes.get("values", [])
            if inside == (codes.get("operator", "In") == "In"):
                return rule["action"], (container, position)
        return "Count", ("", -1)

    # ------------------------------------------------------------------ pods: creating and running

    def _start_pod(self, job: dict[str, Any], index: int) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        hostname = f"{meta['name']}-{index}"
        labels = {**(template["metadata"].get("labels") or {}), COMPLETION_INDEX: str(index),
                  "batch.kubernetes.io/job-name": meta["name"], "batch.kubernetes.io/controller-uid": meta["uid"]}
        pod = self.cluster.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{hostname}-{suffix}", "namespace": self.namespace, "labels": labels,
                "annotations": {**(template["metadata"].get("annotations") or {}), COMPLETION_INDEX: str(index)},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                                     "controller": True, "blockOwnerDeletion": True}],
                "finalizers": [JOB_TRACKING_FINALIZER],
            },
            "spec": {**template["spec"], "hostname": hostname, "nodeName": NODE_NAME},
        })
        self._write_pod_status(pod["metadata"]["name"], {
            "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]})
        self.runs.append(self._run_pod(pod, meta, index))
        self._write_started_status(self.runs[-1])

    def _write_started_status(self, run: PodRun) -> None:
        """Pending while an init container runs (the main one waits in PodInitializing), else Running."""
        spec = run.pod["spec"]
        main = spec["containers"][0]
        running = {"running": {"startedAt": run.started_at}}
        inits = [*run.init_statuses]
        if run.remaining:  # an init container runs
            inits.append({"name": run.container, "ready": False, "restartCount": 0, "started": True, "state": running})
            inits += [{"name": c["name"], "ready": False, "restartCount": 0,
                       "state": {"waiting": {"reason": "PodInitializing"}}} for c in run.remaining[:-1]]
            self._write_pod_status(run.name, {
                "phase": "Pending", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": run.started_at,
                "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                               *({"type": t, "status": "False", "reason": "ContainersNotInitialized" if t == "Initialized"
                                  else "ContainersNotReady", "lastTransitionTime": now()}
                                 for t in ("Initialized", "ContainersReady", "Ready"))],
                "initContainerStatuses": inits,
                "containerStatuses": [{"name": main["name"], "image": main.get("image", ""), "ready": False, "started": False,
                                       "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}],
            })
            return
        status: dict[str, Any] = {
            "phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": now(),
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now()}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": main["name"], "image": main.get("image", ""), "ready": True,
                                   "started": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": run.started_at}}}],
        }
        if inits:
            status["initContainerStatuses"] = inits
        self._write_pod_status(run.name, status)

    def _run_pod(self, pod: dict[str, Any], job_meta: dict[str, Any], index: int) -> PodRun:
        """Prepare the pod's root and volumes, then start its first container (init containers first)."""
        spec = pod["spec"]
        if len(spec["containers"]) != 1:
            raise NodeError("the local node runs pods of exactly one (main) container")
        name = pod["metadata"]["name"]
        pod_dir = self.root / "pods" / self.namespace / name
        rootfs = self.root / "rootfs" / self.namespace / spec["hostname"]
        if rootfs.exists():
            shutil.rmtree(rootfs)  # links and placeholders only: the volumes live elsewhere
        rootfs.mkdir(parents=True)
        volumes = self._materialise_volumes(spec, pod_dir / "volumes")
        for container_path, host in self.image_files.items():
            self._link(rootfs, container_path, host)
        first, *rest = [*(spec.get("initContainers") or []), spec["containers"][0]]
        run = PodRun(
            name=name, namespace=self.namespace, job=job_meta["name"], job_uid=job_meta["uid"], index=index,
            rootfs=rootfs, log_path=pod_dir / "container.log", process=None,  # type: ignore[arg-type]
            termination_message_path="/dev/termination-log", fallback_to_logs=False,
            grace_seconds=float(spec.get("terminationGracePeriodSeconds", 30)), started_at=now(),
            remaining=rest, volumes=volumes, pod=pod,
        )
        self._run_container(run, first)
        return run

    def _run_container(self, run: PodRun, container: dict[str, Any]) -> None:
        """Start one container of ``run``'s pod as a process in the pod's root (its mounts linked there)."""
        name, rootfs = run.name, run.rootfs
        mounts = container.get("volumeMounts") or []
        for mount in mounts:
            target = run.volumes[mount["name"]] / mount.get("subPath", "")
            link = rootfs / mount["mountPath"].lstrip("/")
            if link.is_symlink() and link.resolve() == target.resolve():
                continue  # the same mount in an earlier container of the pod
            self._link(rootfs, mount["mountPath"], target)
        message_path = container.get("terminationMessagePath", "/dev/termination-log")
        (rootfs / message_path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / message_path.lstrip("/")).write_text("")

        env = self._environment(container, run.pod, rootfs, [m["mountPath"] for m in mounts])
        argv = [expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])]
        if not argv or argv[0] not in IMAGE_COMMANDS:
            raise NodeError(f"pod {name}: the image has no command {argv[:1]}; known: {sorted(IMAGE_COMMANDS)}")
        # Container paths in the arguments map into the pod's root; the image's own executable is
        # this machine's interpreter, which must not be mapped (a checkout under /tmp would be).
        argv = [IMAGE_COMMANDS[argv[0]]] + [self._container_arg(part, rootfs, [m["mountPath"] for m in mounts]) for part in argv[1:]]
        workdir = rootfs / (container.get("workingDir") or "/").lstrip("/")
        main = not run.remaining
        # The main container's log is the pod's (kubectl logs); an init container's is its own file.
        log_path = run.log_path if main else run.log_path.with_name(f"{container['name']}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            run.process = subprocess.Popen(argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        run.container = container["name"]
        run.termination_message_path = message_path
        run.fallback_to_logs = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        run.started_at = now()

    def _materialise_volumes(self, spec: dict[str, Any], folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            name = volume["name"]
            if "configMap" in volume or "secret" in volume:
                found[name] = self._key_files(volume, folder / name)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if self.cluster.find("v1", "PersistentVolumeClaim", claim) is None:
                    raise NodeError(f"volume {name}: PersistentVolumeClaim {claim} does not exist")
                found[name] = self.claim_dir(claim)
                found[name].mkdir(parents=True, exist_ok=True)
            elif "emptyDir" in volume:
                found[name] = folder / name
                found[name].mkdir(parents=True, exist_ok=True)
            else:
                raise NodeError(f"volume {name}: only configMap, secret, persistentVolumeClaim and emptyDir volumes run here")
        return found

    def _key_files(self, volume: dict[str, Any], folder: Path) -> Path:
        """A ConfigMap's or Secret's keys as files (``items`` pick and rename keys)."""
        folder.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            source = volume["configMap"]
            data = dict((self.cluster.get("v1", "ConfigMap", source["name"]).get("data") or {}))
        else:
            source = {**volume["secret"], "name": volume["secret"]["secretName"]}
            raw = self.cluster.get("v1", "Secret", source["name"]).get("data") or {}
            data = {k: base64.b64decode(v).decode() for k, v in raw.items()}
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            if item["key"] not in data:
                raise NodeError(f"volume {volume['name']}: {source['name']} has no key {item['key']!r}")
            (folder / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / item["path"]).write_text(data[item["key"]])
        return folder

    @staticmethod
    def _link(rootfs: Path, container_path: str, host: Path) -> None:
        link = rootfs / container_path.lstrip("/")
        if any(parent.is_symlink() for parent in [link, *link.parents] if rootfs in parent.parents):
            raise NodeError(f"{container_path}: nested mounts are not supported by the local node")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(host.resolve(), target_is_directory=host.is_dir())

    def _environment(self, container: dict[str, Any], pod: dict[str, Any], rootfs: Path,
                     mounts: list[str]) -> dict[str, str]:
        declared: dict[str, str] = {}
        for item in container.get("env") or []:
            value = self._env_value(item, pod, declared)
            if value is not None:  # an optional key that is missing sets nothing
                declared[item["name"]] = value
        for name in PATH_VARIABLES:
            if declared.get(name, "").startswith("/"):
                declared[name] = str(rootfs / declared[name].lstrip("/"))
        for name in HOST_VARIABLES:
            if name in declared:
                declared[name] = self.resolve_host(declared[name]) or declared[name]
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **IMAGE_ENV, "KUBECONFIG": str(self.kubeconfig), **declared}

    def _env_value(self, item: dict[str, Any], pod: dict[str, Any], declared: dict[str, str]) -> str | None:
        if "valueFrom" not in item:
            return expand(str(item.get("value", "")), declared)
        source = item["valueFrom"]
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return str((self.cluster.get("v1", "ConfigMap", ref["name"]).get("data") or {})[ref["key"]])
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = self.cluster.find("v1", "Secret", ref["name"])
            data = (secret or {}).get("data") or {}
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise NodeError(f"env {item['name']}: Secret {ref['name']} has no key {ref['key']!r} (CreateContainerConfigError)")
            return base64.b64decode(data[ref["key"]]).decode()
        raise NodeError(f"env {item['name']}: {sorted(source)} is not supported by the local node")

    @staticmethod
    def _container_arg(part: str, rootfs: Path, mounts: list[str]) -> str:
        """An argument that is an absolute path under a volume mount, as the host sees it."""
        if part.startswith("/") and any(part == m or part.startswith(m.rstrip("/") + "/") for m in mounts):
            return str(rootfs / part.lstrip("/"))
        return part

    # ------------------------------------------------------------------ pods: ending

    def _delete_pod(self, run: PodRun) -> None:
        """The pod is deleted (by the Job controller, unless someone did already) and the kubelet sends
        SIGTERM to the container's main process; the job-tracking finalizer keeps the object until it ends."""
        if run.deleted:
            return
        run.deleted = True
        pod = self.cluster.find("v1", "Pod", run.name)
        if pod is not None and not pod["metadata"].get("deletionTimestamp"):
            self.cluster.delete("v1", "Pod", run.name, missing_ok=True)
        run.sigterm_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            run.process.send_signal(signal.SIGTERM)

    def _follow_deletions(self) -> None:
        """The kubelet stops a container whose pod is being deleted by anyone (the garbage collector…)."""
        pods = {p["metadata"]["name"]: p for p in self.cluster.list("v1", "Pod")}
        for run in self.runs:
            if run.alive and not run.deleted:
                pod = pods.get(run.name)
                if pod is None or pod["metadata"].get("deletionTimestamp"):
                    self._delete_pod(run)

    def _reap(self) -> None:
        for run in list(self.runs):
            if not run.alive:
                continue
            code = run.process.poll()
            if code is None:
                if run.sigterm_at is not None and time.monotonic() - run.sigterm_at > run.grace_seconds:
                    self._kill_container(run)
                continue
            self._kill_container(run)  # the container's other processes end with it
            exit_code = code if code >= 0 else 128 - code
            if run.remaining and not run.deleted:  # an init container ended
                run.init_statuses.append({"name": run.container, "ready": exit_code == 0, "restartCount": 0,
                                          "state": {"terminated": self._terminated(run, exit_code)}})
                if exit_code == 0:
                    self._run_container(run, run.remaining.pop(0))
                    self._write_started_status(run)
                    continue
            run.exit_code = exit_code
            run.finished_at = now()
            self._write_pod_status(run.name, self._terminated_status(run))
            self._account(run)
            self._drop_finalizer(run)

    @staticmethod
    def _kill_container(run: PodRun) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.process.pid, signal.SIGKILL)

    def _termination_message(self, run: PodRun, exit_code: int) -> str:
        """The running container's message: its terminationMessagePath file, else (FallbackToLogsOnError) its log tail."""
        written = self.host_path(run, run.termination_message_path)
        message = written.read_bytes()[:MESSAGE_MAX_BYTES].decode(errors="replace") if written.exists() else ""
        log = run.log_path if not run.remaining else run.log_path.with_name(f"{run.container}.log")
        if not message.strip() and run.fallback_to_logs and exit_code != 0 and log.exists():
            message = log_tail(log.read_text(errors="replace"))
        return message

    def _terminated(self, run: PodRun, exit_code: int) -> dict[str, Any]:
        """``state.terminated`` of the container that just ended."""
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                      "startedAt": run.started_at, "finishedAt": now()}
        message = self._termination_message(run, exit_code)
        if message:
            terminated["message"] = message
        return terminated

    def _terminated_status(self, run: PodRun) -> dict[str, Any]:
        container = run.pod["spec"]["containers"][0]
        if run.remaining:  # an init container failed: the main container never started
            run.message = ((run.init_statuses[-1]["state"]["terminated"].get("message") or "") if run.init_statuses else "")
            main_state: dict[str, Any] = {"waiting": {"reason": "PodInitializing"}}
        else:
            run.message = self._termination_message(run, run.exit_code or 0)
            terminated = {"exitCode": run.exit_code, "reason": "Completed" if run.exit_code == 0 else "Error",
                          "startedAt": run.started_at, "finishedAt": run.finished_at}
            if run.message:
                terminated["message"] = run.message
            main_state = {"terminated": terminated}
        status: dict[str, Any] = {
            "phase": "Succeeded" if run.exit_code == 0 else "Failed",
            "conditions": [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now()}
                           for t in ("ContainersReady", "Ready")],
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""), "ready": False,
                                   "started": False, "restartCount": 0, "state": main_state}],
        }
        if run.init_statuses:
            status["initContainerStatuses"] = run.init_statuses
        return status

    def _write_pod_status(self, name: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(ApiException):  # a pod already gone has no status to write
            self.cluster.patch("v1", "Pod", name, {"status": status}, subresource="status")

    def _drop_finalizer(self, run: PodRun) -> None:
        pod = self.cluster.find("v1", "Pod", run.name)
        if pod is None:
            return
        kept = [f for f in pod["metadata"].get("finalizers") or [] if f != JOB_TRACKING_FINALIZER]
        self.cluster.patch("v1", "Pod", run.name, {"metadata": {"finalizers": kept or None}})

