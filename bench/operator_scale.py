"""Operator scale benchmark (issue 14): N FineTuneJobs at once against one operator process.

``python -m bench.operator_scale --n 1000`` starts an API server — the test emulator
(``tests/support/emulating.py``, kmock) in its own process, served over HTTP — or uses the one a
``--kubeconfig`` names, then starts the operator exactly as production runs it (``kubetune
operator``, its own process, no in-process shortcuts), creates N FineTuneJobs at once and plays
the Job controller and kubelet for every Job the operator makes: a pod, then Running
(``startTime``/``active``/``ready`` on the Job, a Running pod), then, once every FineTuneJob shows
phase Running, Succeeded for all of them at once (the pod terminated with exit code 0; the Job's
``succeeded``/``completedIndexes``, ``SuccessCriteriaMet`` and then ``Complete`` +
``completionTime``, in the order kube-controller-manager writes them).

It reports (JSON on stdout or ``--output``, ``--markdown`` appends a table row):

* create → Job exists: p50/p99 from each FineTuneJob's create, and from the last create;
* Job complete (``SuccessCriteriaMet`` written) → ``status.phase: Succeeded``: p50/p99;
* the operator's peak RSS (``VmHWM``) and CPU seconds (user + system, from ``/proc``);
* API requests of the operator per FineTuneJob lifecycle, by verb and resource, and the writes
  among them (create/update/patch/delete, Events and every child included). The emulator counts
  them server-side by User-Agent (the operator's own client and kopf's); on a real cluster they
  are the delta of the API server's ``apiserver_request_total`` minus the bench's own requests;
* errors (operator log lines at ERROR or with a traceback, API answers >= 400 other than the
  404/409 the gateway expects) and lost events (FineTuneJobs that never got a Job or never
  reached Succeeded within the timeout);
* the emulator's own CPU seconds, so a run can say when the emulator, not the operator, is the
  bottleneck.

``--kubeconfig`` expects an API server with no kube-controller-manager running Jobs (for example
kube-apiserver + etcd as envtest starts them): the bench itself is the Job controller, as it is
for the emulator. The CRD must be installed there (``kubetune crd | kubectl apply -f -``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
BENCH_AGENT = "kubetune-bench"
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=kubetune-operator"
JOB_NAME_ANNOTATION = "kubetune.io/job-name"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
EXPECTED_MISSES = {("get", 404), ("delete", 404), ("create", 409)}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return round(ordered[rank - 1], 4)


def classify(method: str, path: str, params: dict[str, str]) -> tuple[str, str] | None:
    """(verb, resource) of a Kubernetes API request, as the API server's audit log names them."""
    parts = [p for p in path.strip("/").split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        rest = parts[3:]
    else:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {
        "GET": ("watch" if params.get("watch") in ("true", "1") else "get" if named else "list"),
        "POST": "create", "PUT": "update", "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }.get(method.upper(), method.lower())
    return verb, resource


# ----------------------------------------------------------------------- the emulator process


def _counting_emulator_class() -> type:
    sys.path.insert(0, str(REPO))
    from tests.support.emulating import ApiServerEmulator

    class CountingEmulator(ApiServerEmulator):  # type: ignore[misc, valid-type]
        """The test emulator, counting requests by (client, verb, resource, status class)."""

        counts: Counter[tuple[str, str, str, int]]

        def __attrs_post_init__(self) -> None:
            self.counts = Counter()
            super().__attrs_post_init__()

        def _serve_resource_request(self, request: Any) -> Any:
            response = super()._serve_resource_request(request)
            agent = {k.lower(): v for k, v in request.headers.items()}.get("user-agent", "")
            client = "bench" if agent.startswith(BENCH_AGENT) else "operator"
            kind = classify(str(request.method.value), request.url.path, dict(request.params))
            if kind is not None:
                self.counts[(client, kind[0], kind[1], int(response.status or 200))] += 1
            return response

    return CountingEmulator


#: Seconds between two ``gc.freeze()`` of the emulator process. The emulator keeps every version of
#: every object for the whole run (watch streams replay from any resourceVersion), a heap that only
#: grows: at N = 3000 each full collection of CPython's cyclic garbage collector scanned all of it
#: for ~2.5 s of CPU, during which the API server answered nobody (a real API server, in Go, collects
#: concurrently). Frozen objects are left out of every later collection; what the emulator stored is
#: never garbage, and the little cyclic garbage alive at a freeze stays until the process ends.
EMULATOR_FREEZE_EVERY = 1.0


def serve_emulator(conn: Any, port: int) -> None:
    """Child process: run the emulator on ``port``; answer 'stats' and 'stop' over ``conn``."""
    sys.path.insert(0, str(REPO))
    from tests.support.emulating import EmulatorThread

    profile_path = os.environ.get("KUBETUNE_BENCH_PROFILE_EMULATOR")  # a file for a cProfile dump of the emulator
    thread = EmulatorThread(port=port, emulator_class=_counting_emulator_class(), bookmark_interval=60.0)
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        serve = thread._run
        thread._run = lambda started: profiler.runcall(serve, started)  # type: ignore[method-assign]
    thread.start()
    conn.send(thread.url)
    while True:
        if not conn.poll(EMULATOR_FREEZE_EVERY):
            gc.freeze()  # what the emulator stored so far (see EMULATOR_FREEZE_EVERY)
            continue
        command = conn.recv()
        if command == "stats":
            counts = thread.call(lambda: dict(thread.emulator.counts))  # type: ignore[union-attr]
            usage = os.times()
            conn.send({"counts": [[*key, value] for key, value in counts.items()],
                       "cpu_seconds": usage.user + usage.system})
        elif command == "stop":
            thread.stop()
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile_path)
            conn.send("stopped")
            return


class EmulatorProcess:
    """The emulator in a child process (its CPU is not the bench's nor the operator's)."""

    def __init__(self) -> None:
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve_emulator, args=(child, self.port), daemon=True)
        self._process.start()
        if not self._conn.poll(60):
            raise RuntimeError("the emulator did not start")
        self.url: str = self._conn.recv()

    def stats(self) -> dict[str, Any]:
        self._conn.send("stats")
        return dict(self._conn.recv())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.send("stop")
            self._conn.poll(10)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()

    def kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "bench", "cluster": {"server": self.url}}],
            "users": [{"name": "bench", "user": {"token": "bench-token"}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
            "current-context": "bench",
        }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far, from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------- the API client of the bench


class Api:
    """A small aiohttp client for the bench's own requests (counted, so they can be told apart)."""

    def __init__(self, kubeconfig: pathlib.Path) -> None:
        import kubernetes

        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=config)
        self.host = str(config.host).rstrip("/")
        headers = {"User-Agent": BENCH_AGENT, "Accept": "application/json"}
        token = (config.api_key or {}).get("authorization") or (config.api_key or {}).get("BearerToken")
        if token:
            headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        self._ssl: ssl.SSLContext | bool = False
        if self.host.startswith("https"):
            context = ssl.create_default_context(cafile=config.ssl_ca_cert)
            if config.cert_file:
                context.load_cert_chain(config.cert_file, config.key_file)
            if not config.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl = context
        self._headers = headers
        self.session: aiohttp.ClientSession | None = None
        self.counts: Counter[tuple[str, str]] = Counter()
        self.failures: list[str] = []

    async def __aenter__(self) -> Api:
        connector = aiohttp.TCPConnector(limit=64, ssl=self._ssl)
        self.session = aiohttp.ClientSession(headers=self._headers, connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self.session is not None
        await self.session.close()

    async def request(self, method: str, path: str, body: Any = None, *, params: dict[str, str] | None = None,
                      content_type: str = "application/json", ok: tuple[int, ...] = ()) -> dict[str, Any] | None:
        assert self.session is not None
        kind = classify(method, path, params or {})
        if kind:
            self.counts[kind] += 1
        data = json.dumps(body) if body is not None else None
        async with self.session.request(method, self.host + path, data=data, params=params,
                                        headers={"Content-Type": content_type}) as response:
            text = await response.text()
            if response.status in ok:
                return None
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {text[:300]}")
            return json.loads(text) if text else {}

    async def watch(self, path: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Events of a watch; reconnects from the last resourceVersion when the stream ends."""
        assert self.session is not None
        rv = params.get("resourceVersion", "")
        while True:
            query = {**params, "watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": "3600"}
            if rv:
                query["resourceVersion"] = rv
            kind = classify("GET", path, query)
            if kind:
                self.counts[kind] += 1
            async with self.session.get(self.host + path, params=query) as response:
                if response.status == 429:  # a real API server whose watch cache is (re)initializing
                    await asyncio.sleep(float(response.headers.get("Retry-After") or 1))
                    continue
                if response.status >= 400:
                    raise RuntimeError(f"watch {path}: {response.status} {await response.text()}")
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        rv = ""
                        break
                    rv = (event.get("object") or {}).get("metadata", {}).get("resourceVersion") or rv
                    if event.get("type") != "BOOKMARK":
                        yield event


# ----------------------------------------------------------------------- the operator process


class OperatorProcess:
    """``kubetune operator`` as production runs it, with RSS/CPU read from /proc."""

    def __init__(self, kubeconfig: pathlib.Path, namespace: str, log_path: pathlib.Path,
                 extra_env: dict[str, str] | None = None, profile: str | None = None, reference: bool = False) -> None:
        self.health_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_TRAINER_IMAGE": "example.test/kubetune-trainer:bench",
            "KUBETUNE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        script = pathlib.Path(sys.executable).with_name("kubetune")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "kubetune.cli"]
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [*command, "operator", "--namespace", namespace]
        if reference:  # the yardstick (bench/reference_operator.py), run as kopf's CLI runs it
            command = [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", namespace,
                       "--liveness", f"http://127.0.0.1:{self.health_port}/healthz",
                       str(REPO / "bench" / "reference_operator.py")]
        if profile:  # py-spy samples the operator (100/s, the thread holding the GIL: Python CPU, not threads blocked in I/O) and writes collapsed stacks at its exit
            spy = pathlib.Path(sys.executable).with_name("py-spy")
            command = [str(spy), "record", "--format", "raw", "--rate", "100", "--gil",
                       "--output", str(pathlib.Path(profile).resolve()), "--", *command]
        self.process = subprocess.Popen(command, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        self._profiled = bool(profile)
        self._pid: int | None = None if profile else self.process.pid

    @property
    def pid(self) -> int:
        """The operator's own process (py-spy's child when profiled)."""
        while self._pid is None:
            children = pathlib.Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            if children:
                self._pid = int(children[0])
            else:
                time.sleep(0.05)
        return self._pid

    async def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the operator exited: {self.log_path.read_text()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"http://127.0.0.1:{self.health_port}/healthz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise RuntimeError("the operator's /healthz did not answer")

    def usage(self) -> dict[str, float]:
        """Peak RSS (MB) and CPU seconds of the operator process so far."""
        status = pathlib.Path(f"/proc/{self.pid}/status").read_text()
        hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        cpu = process_cpu_seconds(self.pid)
        return {"peak_rss_mb": round(hwm_kb / 1024, 1), "rss_mb": round(rss_kb / 1024, 1), "cpu_seconds": round(cpu, 2)}

    def loaded_modules(self) -> str:
        """The operator's memory map: which shared objects (torch…) it has loaded."""
        return pathlib.Path(f"/proc/{self.pid}/maps").read_text()

    def stop(self) -> str:
        if self.process.poll() is None:
            # Profiled: the operator stops and py-spy, seeing it exit, writes its file.
            os.kill(self.pid, signal.SIGINT) if self._profiled else self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.log_path.read_text(errors="replace")


def log_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]


# ----------------------------------------------------------------------- the run


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
        "metadata": {"name": name, "labels": {"bench": "operator-scale"}},
        "spec": {
            "model": {"source": "hf://sshleifer/tiny-gpt2"},
            "data": {"datasets": [{"source": "data/tiny.jsonl", "format": "text"}]},
            "training": {"maxSteps": 5},
        },
    }


class Run:
    """One benchmark run: the clock of every FineTuneJob, and the Job controller's part."""

    def __init__(self, api: Api, namespace: str, n: int, concurrency: int) -> None:
        self.api, self.namespace, self.n = api, namespace, n
        self.limit = asyncio.Semaphore(concurrency)
        self.names = [f"ftj-{i:05d}" for i in range(n)]
        self.created: dict[str, float] = {}
        self.job_seen: dict[str, float] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.completed: dict[str, float] = {}
        self.phase_seen: dict[str, dict[str, float]] = {name: {} for name in self.names}
        self.changed = asyncio.Event()
        self.controller_errors: list[str] = []
        self.lags: list[float] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def _ns(self, group: str, version: str, plural: str, name: str = "", sub: str = "") -> str:
        base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
        path = f"{base}/namespaces/{self.namespace}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.controller_errors.append(repr(task.exception()))

    async def watch_jobs(self) -> None:
        path = self._ns("batch", "v1", "jobs")
        async for event in self.api.watch(path, {"labelSelector": MANAGED_SELECTOR}):
            job = event["object"]
            owner = (job["metadata"].get("annotations") or {}).get(JOB_NAME_ANNOTATION, job["metadata"]["name"])
            if event["type"] == "ADDED" and owner in self.phase_seen and owner not in self.job_seen:
                self.job_seen[owner] = time.monotonic()
                self.jobs[owner] = job
                self.changed.set()
                self._spawn(self.start_job(owner, job))

    async def watch_finetunejobs(self) -> None:
        async for event in self.api.watch(self._ns(GROUP, VERSION, PLURAL), {}):
            obj = event["object"]
            name = obj["metadata"]["name"]
            phase = (obj.get("status") or {}).get("phase")
            seen = self.phase_seen.get(name)
            if seen is not None and phase and phase not in seen:
                seen[phase] = time.monotonic()
                self.changed.set()

    async def create_all(self) -> None:
        async def create(name: str) -> None:
            async with self.limit:
                await self.api.request("POST", self._ns(GROUP, VERSION, PLURAL), manifest(name))
                self.created[name] = time.monotonic()
        await asyncio.gather(*(create(name) for name in self.names))

    # The Job controller and kubelet, as far as the operator can see them.
    def _pod_name(self, job: dict[str, Any]) -> str:
        return f"{job['metadata']['name']}-0-{uuid.uuid4().hex[:5]}"

    async def start_job(self, owner: str, job: dict[str, Any]) -> None:
        async with self.limit:
            template = job["spec"]["template"]
            meta = template.get("metadata") or {}
            pod_name = self._pod_name(job)
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "labels": {**(meta.get("labels") or {}), "batch.kubernetes.io/job-completion-index": "0",
                               "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                               "batch.kubernetes.io/job-name": job["metadata"]["name"]},
                    "annotations": {**(meta.get("annotations") or {}), "batch.kubernetes.io/job-completion-index": "0"},
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                         "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
                    "finalizers": ["batch.kubernetes.io/job-tracking"],
                },
                "spec": {**template["spec"], "nodeName": "bench-node"},
            }
            job["bench_pod"] = pod_name
            await self.api.request("POST", self._ns("", "v1", "pods"), pod)
            jobs_path = self._ns("batch", "v1", "jobs", job["metadata"]["name"], "status")
            started = now_iso()
            await self.api.request("PATCH", jobs_path, {"status": {
                "startTime": started, "active": 1, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {}}},
                content_type="application/merge-patch+json")
            await self.api.request("PATCH", self._ns("", "v1", "pods", pod_name, "status"), {"status": {
                "phase": "Running", "startTime": started, "podIP": "10.0.0.1", "hostIP": "10.0.0.2",
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                               for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                "containerStatuses": [{"name": c["name"], "ready": True, "restartCount": 0, "started": True,
                                       "image": c.get("image", ""), "imageID": "", "containerID": "containerd://bench",
                                       "state": {"running": {"startedAt": started}}}
                                      for c in template["spec"]["containers"]]}},
                content_type="application/merge-patch+json")
            await self.api.request("PATCH", jobs_path, {"status": {"ready": 1}}, content_type="application/merge-patch+json")

    async def complete_job(self, owner: str) -> None:
        async with self.limit:
            job = self.jobs[owner]
            job_name, pod_name = job["metadata"]["name"], job["bench_pod"]
            finished = now_iso()
            containers = job["spec"]["template"]["spec"]["containers"]
            await self.api.request("PATCH", self._ns("", "v1", "pods", pod_name, "status"), {"status": {
                "phase": "Succeeded",
                "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": finished},
                               {"type": "ContainersReady", "status": "False", "reason": "PodCompleted",
                                "lastTransitionTime": finished}],
                "containerStatuses": [{"name": c["name"], "ready": False, "restartCount": 0, "started": False,
                                       "image": c.get("image", ""), "imageID": "", "containerID": "containerd://bench",
                                       "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                                "startedAt": finished, "finishedAt": finished,
                                                                "containerID": "containerd://bench"}}}
                                      for c in containers]}},
                content_type="application/merge-patch+json")
            jobs_path = self._ns("batch", "v1", "jobs", job_name, "status")
            criteria = {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                        "message": "Reached expected number of succeeded pods",
                        "lastProbeTime": finished, "lastTransitionTime": finished}
            await self.api.request("PATCH", jobs_path, {"status": {
                "active": 0, "ready": 0, "succeeded": 1, "completedIndexes": "0", "terminating": 0,
                "uncountedTerminatedPods": {}, "conditions": [criteria]}}, content_type="application/merge-patch+json")
            self.completed[owner] = time.monotonic()
            # The pod's tracking finalizer goes, then the Job is marked Complete.
            await self.api.request("PATCH", self._ns("", "v1", "pods", pod_name), {"metadata": {"finalizers": None}},
                                   content_type="application/merge-patch+json")
            await self.api.request("PATCH", jobs_path, {"status": {"completionTime": finished, "conditions": [
                criteria, {**criteria, "type": "Complete"}]}}, content_type="application/merge-patch+json")

    async def wait(self, what: str, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                print(f"timed out waiting for {what}", file=sys.stderr)
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))
        return True

    async def loop_lag(self, every: float = 0.01) -> None:
        """How late this process's event loop wakes from a short sleep (its clocks are stamped there)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(every)
            self.lags.append(max(0.0, loop.time() - before - every))

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _commit() -> str | None:
    """The checkout's commit (a ``+`` when it has uncommitted changes), for the result file."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+" if dirty else "")
    return None


def _phase_sample(operator: OperatorProcess, emulator: EmulatorProcess | None) -> dict[str, float | None]:
    """CPU seconds so far of the operator, the emulator (None on a real cluster) and this process."""
    own = os.times()
    return {"operator": operator.usage()["cpu_seconds"],
            "emulator": emulator.stats()["cpu_seconds"] if emulator else None,
            "bench": own.user + own.system}


def completion_report(run: Run, started: float, sent: float, finished: float,
                      before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, Any]:
    """The completion phase alone (from every FineTuneJob Running to every one Succeeded): its length,
    each process's CPU per completed job, how far this process's event loop lagged (its clocks are
    stamped there), and complete → Succeeded by the order in which the bench completed the Jobs (ten
    slices: flat means a constant delay, rising means a backlog that grows through the burst)."""
    n = max(1, len(run.completed))
    cpu = {name: (round(1000 * (after[name] - before[name]) / n, 2)  # type: ignore[operator]
                  if before[name] is not None and after[name] is not None else None) for name in before}
    order = sorted(run.completed, key=run.completed.__getitem__)
    latencies = [run.phase_seen[name]["Succeeded"] - run.completed[name] for name in order
                 if "Succeeded" in run.phase_seen[name]]
    slices = [latencies[len(latencies) * i // 10: len(latencies) * (i + 1) // 10] for i in range(10)]
    return {
        "phase_s": round(finished - started, 2),
        "monotonic_start_end": [round(started, 3), round(finished, 3)],
        "completions_sent_s": round(sent - started, 2),
        "cpu_ms_per_job": cpu,
        "bench_loop_lag_s": {"p50": percentile(run.lags, 50), "p99": percentile(run.lags, 99),
                             "max": percentile(run.lags, 100)},
        "latency_by_completion_order_s": [
            {"mean": round(sum(part) / len(part), 3), "max": round(max(part), 3)} if part else None for part in slices],
    }


def requests_table(counts: Counter[tuple[str, str]], n: int) -> dict[str, Any]:
    by_kind = {f"{verb} {resource}": round(count / n, 2) for (verb, resource), count in sorted(counts.items())}
    writes = sum(count for (verb, _), count in counts.items() if verb in WRITE_VERBS)
    total = sum(count for (verb, _), count in counts.items() if verb != "watch")
    return {"per_lifecycle": by_kind, "writes_per_lifecycle": round(writes / n, 2),
            "requests_per_lifecycle": round(total / n, 2), "watches": sum(c for (v, _), c in counts.items() if v == "watch")}


def _operator_counts(stats: dict[str, Any]) -> tuple[Counter[tuple[str, str]], list[str]]:
    counts: Counter[tuple[str, str]] = Counter()
    failures: list[str] = []
    for client, verb, resource, status, count in stats["counts"]:
        if client != "operator":
            continue
        counts[(verb, resource)] += count
        if status >= 400 and (verb, status) not in EXPECTED_MISSES:
            failures.append(f"{count}x {verb} {resource} -> {status}")
    return counts, failures


async def _apiserver_counts(api: Api) -> Counter[tuple[str, str]]:
    """apiserver_request_total by (verb, resource[/subresource]) from a real API server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    assert api.session is not None
    async with api.session.get(api.host + "/metrics") as response:
        text = await response.text()
    counts: Counter[tuple[str, str]] = Counter()
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete", "WATCH": "watch",
             "GET": "get", "LIST": "list", "APPLY": "patch"}
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = sample.labels
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[(verbs.get(labels.get("verb", ""), labels.get("verb", "").lower()), resource)] += int(sample.value)
    return counts


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kubetune-opscale-"))
    emulator: EmulatorProcess | None = None
    crd_server: Any = None
    api_server = "emulator"
    if args.crd_server:
        from bench.crd_apiserver import ShimmedCrdServer

        crd_server = ShimmedCrdServer(args.crd_server, workdir).start()
        kubeconfig, api_server = crd_server.kubeconfig_path, crd_server.describe()
    elif args.kubeconfig:
        kubeconfig = pathlib.Path(args.kubeconfig).expanduser().resolve()
        api_server = "real (--kubeconfig)"
    else:
        emulator = EmulatorProcess()
        kubeconfig = workdir / "kubeconfig.yaml"
        kubeconfig.write_text(yaml.safe_dump(emulator.kubeconfig()))
    namespace = args.namespace or f"opscale-{uuid.uuid4().hex[:6]}"
    operator: OperatorProcess | None = None
    result: dict[str, Any] = {"n": args.n, "api_server": api_server,
                              "operator_under_test": "reference (bench/reference_operator.py)" if args.reference else "kubetune",
                              "date": now_iso(), "cpus": os.cpu_count(), "namespace": namespace,
                              "commit": _commit(), "load_before": list(os.getloadavg())}
    try:
        async with Api(kubeconfig) as api:
            await api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                              "metadata": {"name": namespace}}, ok=(409,))
            operator = OperatorProcess(kubeconfig, namespace, workdir / "operator.log", extra_env=args.operator_env,
                                       profile=args.profile_operator, reference=args.reference)
            await operator.wait_healthy()
            run = Run(api, namespace, args.n, args.concurrency)
            watchers = [asyncio.create_task(run.watch_jobs()), asyncio.create_task(run.watch_finetunejobs())]
            await asyncio.sleep(args.settle)  # the operator's watches are open
            before_usage = operator.usage()
            before = emulator.stats() if emulator else None
            server_cpu_before = crd_server.cpu_seconds() if crd_server else None
            before_real = await _apiserver_counts(api) if not emulator else None
            before_bench = Counter(api.counts)

            started = time.monotonic()
            await run.create_all()
            last_create = max(run.created.values())
            all_jobs = await run.wait("every Job", lambda: len(run.job_seen) == args.n, args.timeout)
            await run.drain()
            all_running = await run.wait("phase Running everywhere",
                                         lambda: all("Running" in s for s in run.phase_seen.values()), args.timeout)
            # What this process holds now (every Job, every clock) lives to the end: out of the
            # collector's way, so no full collection here delays the clocks of the completions.
            gc.collect()
            gc.freeze()
            running_at = time.monotonic()
            phase_start = _phase_sample(operator, emulator)
            lag = asyncio.create_task(run.loop_lag())
            await asyncio.gather(*(run.complete_job(name) for name in run.names if name in run.jobs))
            completions_sent = time.monotonic()
            all_done = await run.wait("phase Succeeded everywhere",
                                      lambda: all("Succeeded" in run.phase_seen[n] for n in run.completed), args.timeout)
            finished = time.monotonic()
            phase_end = _phase_sample(operator, emulator)
            gc.unfreeze()
            lag.cancel()
            await asyncio.sleep(args.settle)  # late writes of the operator count too
            after_usage = operator.usage()
            after = emulator.stats() if emulator else None
            after_real = await _apiserver_counts(api) if not emulator else None
            for task in watchers:
                task.cancel()
            modules = operator.loaded_modules()

            to_job = [run.job_seen[n] - run.created[n] for n in run.job_seen if n in run.created]
            from_last = [max(0.0, run.job_seen[n] - last_create) for n in run.job_seen]
            to_done = [run.phase_seen[n]["Succeeded"] - run.completed[n] for n in run.completed
                       if "Succeeded" in run.phase_seen[n]]
            if emulator:
                assert before is not None and after is not None
                counts_after, failures = _operator_counts(after)
                counts_before, failures_before = _operator_counts(before)
                counts = counts_after - counts_before
                failures = [f for f in failures if f not in failures_before]
                emulator_cpu = round(after["cpu_seconds"] - before["cpu_seconds"], 2)
            else:
                assert before_real is not None and after_real is not None
                counts = (after_real - before_real) - (api.counts - before_bench)
                failures, emulator_cpu = [], None
                if crd_server:  # etcd + API server + shim, as the emulator's CPU is reported
                    emulator_cpu = round(crd_server.cpu_seconds() - server_cpu_before, 2)
            log = operator.stop()
            operator = None
            errors = log_errors(log)
            lost = (args.n - len(run.job_seen)) + (len(run.completed) - len(to_done))
            wall = finished - started
            result.update({
                "create_to_job_s": {"p50": percentile(to_job, 50), "p99": percentile(to_job, 99), "max": percentile(to_job, 100)},
                "last_create_to_job_s": {"p50": percentile(from_last, 50), "p99": percentile(from_last, 99),
                                         "max": percentile(from_last, 100)},
                "complete_to_succeeded_s": {"p50": percentile(to_done, 50), "p99": percentile(to_done, 99),
                                            "max": percentile(to_done, 100)},
                "create_burst_s": round(last_create - started, 2),
                "running_phase_s": round(running_at - started, 2),
                "wall_s": round(wall, 2),
                "operator": {"peak_rss_mb": after_usage["peak_rss_mb"],
                             "rss_idle_mb": before_usage["rss_mb"],
                             "cpu_seconds": round(after_usage["cpu_seconds"] - before_usage["cpu_seconds"], 2),
                             "torch_loaded": "/torch/" in modules},
                "emulator_cpu_seconds": emulator_cpu,  # the API server's (etcd + server + shim) with --crd-server
                "api_server_cpu_seconds": emulator_cpu,
                "bench_requests": sum(api.counts.values()) - sum(before_bench.values()),
                "api": requests_table(counts, args.n),
                "errors": {"operator_log": len(errors), "api": failures, "controller": run.controller_errors,
                           "examples": errors[:5]},
                "lost": lost,
                "load_after": list(os.getloadavg()),
                "completion": completion_report(run, running_at, completions_sent, finished, phase_start, phase_end),
                "complete": bool(all_jobs and all_running and all_done),
            })
            return result
    finally:
        if operator is not None:
            log = operator.stop()
            result.setdefault("operator_log_tail", log[-3000:])
        if emulator is not None:
            emulator.stop()
        if crd_server is not None:
            crd_server.stop()


# ----------------------------------------------------------------------- the emulator alone


class OperatorMix:
    """The requests the operator makes per lifecycle, replayed by a lean client (no kopf, no handlers):
    the GET of the new FineTuneJob, its children as ``building.plan`` renders them (the same objects,
    so the same sizes; created at once, the Job last), the three status patches (Created with
    Initializing, Running, Succeeded) and the two Events; and the operator's three watch streams
    (FineTuneJobs; Jobs and pods label-selected), whose events are read and decoded."""

    def __init__(self, run: Run) -> None:
        sys.path.insert(0, str(REPO))
        from kubetune.operator import building, creating, kubeapi

        self.run, self.api = run, run.api
        self._event_body, self._resources = kubeapi.event_body, kubeapi.RESOURCES
        self._plan = lambda body: building.plan(creating.parse_body(body), building.BuildOptions(
            trainer_image="example.test/kubetune-trainer:bench"))
        self.events_seen = 0

    async def watch(self, path: str, params: dict[str, str]) -> None:
        async for _ in self.api.watch(path, params):
            self.events_seen += 1

    def watches(self) -> list[asyncio.Task[None]]:
        ns = self.run._ns
        return [asyncio.create_task(self.watch(path, params)) for path, params in (
            (ns(GROUP, VERSION, PLURAL), {}), (ns("batch", "v1", "jobs"), {"labelSelector": MANAGED_SELECTOR}),
            (ns("", "v1", "pods"), {"labelSelector": MANAGED_SELECTOR}))]

    async def _status(self, name: str, phase: str, reason: str, first: bool = False) -> None:
        at = now_iso()
        conditions = ([{"type": "Created", "status": "True", "reason": "ResourcesCreated", "message": "created",
                        "lastTransitionTime": at, "observedGeneration": 1}] if first else [])
        conditions.append({"type": phase, "status": "True", "reason": reason, "message": f"{phase.lower()}",
                           "lastTransitionTime": at, "observedGeneration": 1})
        status: dict[str, Any] = {"phase": phase, "message": phase.lower(), "conditions": conditions}
        if first:
            status.update({"techniques": "full", "observedGeneration": 1})
        await self.api.request("PATCH", self.run._ns(GROUP, VERSION, PLURAL, name, "status"), {"status": status},
                               content_type="application/merge-patch+json")

    async def _event(self, ftj: dict[str, Any], reason: str) -> None:
        event = self._event_body(ftj, reason=reason, message=reason)  # the operator's own Event
        await self.api.request("POST", self.run._ns("", "v1", "events"), event)

    async def lifecycle(self, name: str) -> None:
        run, api = self.run, self.api
        async with run.limit:
            await api.request("POST", run._ns(GROUP, VERSION, PLURAL), manifest(name))  # the user's create
            run.created[name] = time.monotonic()
            live = await api.request("GET", run._ns(GROUP, VERSION, PLURAL, name))
            assert live is not None
            *children, job = self._plan(live)
            await asyncio.gather(*(api.request("POST", self._collection(child), child) for child in children))
            made = await api.request("POST", self._collection(job), job)
            assert made is not None
            await self._status(name, "Initializing", "JobCreated", first=True)
        run.jobs[name] = made
        await run.start_job(name, made)  # the Job controller and kubelet, as in the full run
        await self._status(name, "Running", "PodsRunning")
        await self._event(live, "PodsRunning")
        await run.complete_job(name)
        await self._status(name, "Succeeded", "JobSucceeded")
        await self._event(live, "JobSucceeded")

    def _collection(self, obj: dict[str, Any]) -> str:
        return self.run._ns(*self._resources[obj["kind"]])


async def run_emulator_only(args: argparse.Namespace) -> dict[str, Any]:
    """N lifecycles of the operator's request mix against the emulator, with no operator: the
    emulator's own ceiling (lifecycles per second, CPU per lifecycle) on this machine."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kubetune-emulator-only-"))
    emulator = EmulatorProcess()
    kubeconfig = workdir / "kubeconfig.yaml"
    kubeconfig.write_text(yaml.safe_dump(emulator.kubeconfig()))
    namespace = f"emulator-only-{uuid.uuid4().hex[:6]}"
    try:
        async with Api(kubeconfig) as api:
            await api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                              "metadata": {"name": namespace}}, ok=(409,))
            run = Run(api, namespace, args.n, args.concurrency)
            mix = OperatorMix(run)
            watchers = mix.watches()
            await asyncio.sleep(0.5)
            before, bench_before, counts_before = emulator.stats(), os.times(), Counter(api.counts)
            started = time.monotonic()
            await asyncio.gather(*(mix.lifecycle(name) for name in run.names))
            wall = time.monotonic() - started
            await asyncio.sleep(0.5)  # the watch streams catch up
            after, bench_after = emulator.stats(), os.times()
            for task in watchers:
                task.cancel()
            emulator_cpu = after["cpu_seconds"] - before["cpu_seconds"]
            counts = api.counts - counts_before
            return {
                "mode": "emulator-only", "n": args.n, "date": now_iso(), "cpus": os.cpu_count(),
                "concurrency": args.concurrency, "wall_s": round(wall, 2),
                "lifecycles_per_s": round(args.n / wall, 1),
                "emulator_cpu_seconds": round(emulator_cpu, 2),
                "emulator_cpu_ms_per_lifecycle": round(1000 * emulator_cpu / args.n, 2),
                "emulator_ceiling_lifecycles_per_s": round(args.n / emulator_cpu, 1) if emulator_cpu else None,
                "client_cpu_seconds": round((bench_after.user + bench_after.system)
                                            - (bench_before.user + bench_before.system), 2),
                "watch_events": mix.events_seen,
                "api": requests_table(counts, args.n),
                "errors": run.controller_errors,
            }
    finally:
        emulator.stop()


def markdown_row(result: dict[str, Any], label: str = "") -> str:
    api, op = result["api"], result["operator"]
    errors = result["errors"]
    error_count = errors["operator_log"] + len(errors["api"]) + len(errors["controller"])
    return (f"| {label or result['date']} | {result['api_server']} | {result['n']} | "
            f"{result['create_to_job_s']['p50']} / {result['create_to_job_s']['p99']} | "
            f"{result['last_create_to_job_s']['p50']} / {result['last_create_to_job_s']['p99']} | "
            f"{result['complete_to_succeeded_s']['p50']} / {result['complete_to_succeeded_s']['p99']} | "
            f"{op['peak_rss_mb']} | {op['cpu_seconds']} | {result['emulator_cpu_seconds']} | "
            f"{api['writes_per_lifecycle']} | {api['requests_per_lifecycle']} | {error_count} | {result['lost']} |")


MARKDOWN_HEADER = (
    "| run | API server | N | create→Job p50 / p99 s | last create→Job p50 / p99 s | complete→Succeeded p50 / p99 s "
    "| operator peak RSS MB | operator CPU s | API server CPU s | writes / lifecycle | requests / lifecycle "
    "| errors | lost |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="FineTuneJobs created at once (100, 1000, 3000)")
    parser.add_argument("--kubeconfig", default=None, help="a real API server (no Job controller) instead of the emulator")
    parser.add_argument("--crd-server", default=None, metavar="DIR",
                        help="Kubernetes' API server code instead of the emulator: etcd, apiextensions-apiserver and "
                             "bench/apishim as tests/support/build_crd_server.sh DIR builds them (bench/crd_apiserver.py)")
    parser.add_argument("--reference", action="store_true",
                        help="run the issue's yardstick, a minimal idiomatic kopf operator (bench/reference_operator.py), "
                             "instead of kubetune's")
    parser.add_argument("--namespace", default=None, help="namespace to use (default: a fresh one)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests the bench keeps in flight")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each stage")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before creating and after the last phase")
    parser.add_argument("--output", default=None, help="write the JSON result here too")
    parser.add_argument("--label", default="", help="the run's name in the Markdown row")
    parser.add_argument("--markdown", action="store_true", help="also print the Markdown table row")
    parser.add_argument("--operator-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the operator process (repeatable)")
    parser.add_argument("--profile-operator", default=None, metavar="FILE",
                        help="sample the operator with py-spy (pip install py-spy) into FILE (collapsed stacks); "
                             "python -m bench.profile_summary FILE prints its top functions")
    parser.add_argument("--emulator-only", action="store_true",
                        help="no operator: replay its request mix per lifecycle from a lean client and report the "
                             "emulator's ceiling (lifecycles/s, CPU per lifecycle)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.operator_env = dict(item.split("=", 1) for item in args.operator_env)
    result = asyncio.run(run_emulator_only(args) if args.emulator_only else run_bench(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    if args.emulator_only:
        return 0 if not result["errors"] else 1
    if args.markdown:
        print(MARKDOWN_HEADER)
        print(markdown_row(result, args.label))
    return 0 if result.get("complete") and not result.get("lost") else 1


if __name__ == "__main__":
    sys.exit(main())
