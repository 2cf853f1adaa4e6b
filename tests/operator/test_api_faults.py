"""The real operator (kopf) against an API server that fails: it retries with backoff and converges.

Faults are injected into the emulator (``tests.support.emulating``) as kmock reactions placed
before its own handling: :class:`Fault` answers the first N requests that match with an error
(500, 503, 429 with ``Retry-After``, 409 Conflict), optionally after letting the write land (a
create that succeeded but whose answer was lost), and then lets requests through. Watch streams
are answered with a ``410 Gone`` ERROR event (resource version too old: kopf lists again), closed
at once (a dropped connection), or broken mid-event. Properties: every child is created exactly
once, the phase reaches what the Job says, each fault was really met, and the operator logs no
traceback (``run_operator`` checks its output).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kmock
import pytest

from kubetune.api import ConditionType, Reason
from kubetune.operator import kubeapi, naming, retrying
from tests.operator.operating import FTJ, JobController, condition, events, manifest, status, wait_phase
from tests.support.clusters import Cluster

Operator = Callable[..., Any]
SELECTOR = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"
CHILD_KINDS = [("batch/v1", "Job"), ("v1", "ConfigMap"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"),
               ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
               ("rbac.authorization.k8s.io/v1", "RoleBinding")]


def _status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}


def _method(request: kmock.Request) -> str:
    return str(request.method.value).upper()


def _plural(request: kmock.Request) -> str | None:
    return request.resource.plural if request.resource is not None else None


def _operator(request: kmock.Request) -> bool:
    return request.headers.get("User-Agent", "").startswith(kubeapi.USER_AGENT)


def _kopf(request: kmock.Request) -> bool:
    return request.headers.get("User-Agent", "").startswith("kopf")


def _watch(request: kmock.Request) -> bool:
    return _method(request) == "GET" and request.params.get("watch") in ("true", "1")


@dataclass
class Fault:
    """Answer the first ``times`` requests that reach it with ``status`` (and ``headers``); with
    ``land`` the request is served first and only its answer is lost. Then it steps aside."""

    emulator: Any
    status: int
    times: int
    headers: dict[str, str] = field(default_factory=dict)
    land: bool = False
    delay: float = 0.0
    body: dict[str, Any] | None = None  # the Status answered, when not the default one
    met: list[float] = field(default_factory=list)  # when each injected answer was given

    async def __call__(self, request: kmock.Request) -> Any:
        if len(self.met) >= self.times:
            return NotImplemented  # no longer failing: the emulator's own handling answers
        self.met.append(time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.land:
            self.emulator._serve_resource_request(request)  # the write happens; the client never hears so
        reason = {403: "Forbidden", 409: "Conflict", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
                  503: "ServiceUnavailable"}[self.status]
        return kmock.Response(status=self.status, headers=self.headers,
                              payload=self.body or _status_body(self.status, reason, f"injected {self.status}"))


@dataclass
class WatchFault:
    """The first ``times`` watch requests that reach it get ``kind``: ``gone`` (an ERROR event with
    code 410, as for a too old resourceVersion), ``dropped`` (the stream ends before any event) or
    ``broken`` (the connection fails in the middle of an event)."""

    kind: str
    times: int
    met: int = 0

    def __call__(self, request: kmock.Request) -> Any:
        if self.met >= self.times:
            return NotImplemented
        self.met += 1
        if self.kind == "gone":
            event = {"type": "ERROR", "object": _status_body(410, "Expired", "too old resource version: 1 (4242)")}
            return kmock.Response(status=200, payload=event)
        if self.kind == "dropped":
            return kmock.Response(status=200, payload=b"")
        return kmock.Response(status=200, payload=(b'{"type": "MODIFIED", "object": {"metadata": {"na', _reset))


async def _reset(request: kmock.Request) -> None:
    """The TCP connection is lost in the middle of a chunk (a node or load balancer going away)."""
    await asyncio.sleep(0.05)  # the partial event reaches the client first
    request._raw_request.transport.abort()  # type: ignore[union-attr]


class Injector:
    """One kmock reaction for all the faults of a test (each reaction costs every request a filter
    pass): the first fault whose predicate matches and that still has failures to give answers."""

    def __init__(self, cluster: Cluster) -> None:
        self.faults: list[tuple[Callable[[kmock.Request], bool], Any]] = []
        cluster.emulator.emulator[lambda r: r.resource is not None] << self  # type: ignore[union-attr]

    async def __call__(self, request: kmock.Request) -> Any:
        for matches, fault in self.faults:
            if matches(request):
                answer = fault(request)
                answer = await answer if asyncio.iscoroutine(answer) else answer
                if answer is not NotImplemented:
                    return answer
        # "matched, nothing to say": kmock goes on to the emulator's handling (a ReactionMismatchError,
        # which returning NotImplemented means, would disable this reaction for good)
        raise NotImplementedError


def inject(cluster: Cluster, matches: Callable[[kmock.Request], bool], fault: Any) -> Any:
    injector = getattr(cluster, "_fault_injector", None)  # one per cluster (and so per emulator)
    if injector is None:
        injector = Injector(cluster)
        cluster._fault_injector = injector  # type: ignore[attr-defined]
    injector.faults.append((matches, fault))
    return fault


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrying, "MAX_DELAY", 0.2)
    monkeypatch.setattr(kubeapi, "RETRY_WAIT_MIN", 0.05)
    monkeypatch.setattr(kubeapi, "RETRY_WAIT_MAX", 0.2)


def assert_children_once(cluster: Cluster, names: list[str], multi_node: list[str]) -> None:
    """One object of each child kind per FineTuneJob, no more (names are deterministic); the
    rendezvous Service only for the jobs of several nodes."""
    for api, kind in CHILD_KINDS:
        found = cluster.list(api, kind, label_selector=SELECTOR)
        owners = sorted(o["metadata"]["labels"][naming.LABEL_JOB] for o in found)
        assert owners == sorted(multi_node if kind == "Service" else names), (kind, [o["metadata"]["name"] for o in found])


def finish(cluster: Cluster, job_controller: JobController, name: str) -> dict[str, Any]:
    job_controller.add_pod(name, 0, {"phase": "Running"})
    job_controller.set_status(name, {"active": 1, "ready": 1})
    wait_phase(cluster, name, "Running", timeout=60)
    job_controller.set_status(name, {"active": 0, "ready": 0, "succeeded": 1,
                                     "conditions": [{"type": "Complete", "status": "True"}]})
    return wait_phase(cluster, name, "Succeeded", timeout=60)


@pytest.mark.slow
def test_server_errors_throttling_and_conflicts_make_each_child_once_and_the_status_converges(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    emulator = cluster.emulator.emulator  # type: ignore[union-attr]

    def creates(plural: str) -> Callable[[kmock.Request], bool]:
        return lambda r: _operator(r) and _method(r) == "POST" and _plural(r) == plural

    faults = {
        # a create that landed but whose answer was lost: the retry meets 409 AlreadyExists, reads it back
        "configmap 500 after the write": inject(cluster, creates("configmaps"), Fault(emulator, 500, 1, land=True)),
        "job 500": inject(cluster, creates("jobs"), Fault(emulator, 500, 1)),
        "service 503": inject(cluster, creates("services"), Fault(emulator, 503, 3)),
        "role 429 Retry-After": inject(cluster, creates("roles"), Fault(emulator, 429, 2, headers={"Retry-After": "1"})),
        "claim: slow answers": inject(cluster, creates("persistentvolumeclaims"), Fault(emulator, 503, 1, delay=1.5)),
        "status 409": inject(cluster, lambda r: _operator(r) and _method(r) == "PATCH" and r.subresource == "status",
                             Fault(emulator, 409, 6)),
        "status reads 500": inject(cluster, lambda r: _operator(r) and _method(r) == "GET" and _plural(r) == "finetunejobs"
                                   and r.name is not None, Fault(emulator, 500, 1)),
        "kopf's own patches 500": inject(cluster, lambda r: _kopf(r) and _method(r) == "PATCH", Fault(emulator, 500, 1)),
    }
    with operator_process(cluster.namespace):
        # two nodes: the rendezvous Service is among the children (a single-node job has none)
        cluster.create(manifest("flaky", resources={"nodes": 2},
                                checkpointing={"storage": {"accessMode": "ReadWriteMany"}}))
        cluster.wait_for(lambda: condition(cluster, "flaky", ConditionType.CREATED), timeout=60, what="flaky created")
        final = finish(cluster, job_controller, "flaky")
        cluster.create(manifest("calm"))  # served after the storm, as usual
        cluster.wait_for(lambda: condition(cluster, "calm", ConditionType.CREATED), timeout=30, what="calm created")
    for what, fault in faults.items():
        assert len(fault.met) == fault.times, (what, len(fault.met))
    assert_children_once(cluster, ["calm", "flaky"], multi_node=["flaky"])
    assert {c["type"]: c["status"] for c in final["conditions"]}[ConditionType.SUCCEEDED] == "True"
    assert final["completionTime"] and status(cluster, "flaky")["phase"] == "Succeeded"
    # Retry-After was honoured: the second 429 came no sooner than a second after the first
    role_429 = faults["role 429 Retry-After"].met
    assert role_429[1] - role_429[0] >= 0.95, role_429


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gone", "dropped", "broken"])
def test_watch_streams_that_expire_drop_or_break_lose_no_event(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController,
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Every watch the operator opens (FineTuneJobs, Jobs, pods) is cut or refused several times,
    while the Job goes from created to running to complete: the phase still follows."""
    monkeypatch.setenv("KUBETUNE_WATCH_SERVER_TIMEOUT", "1")  # streams end every second: many reconnections
    cluster = emulated_cluster
    with operator_process(cluster.namespace):
        cluster.create(manifest("watched"))
        cluster.wait_for(lambda: condition(cluster, "watched", ConditionType.CREATED), timeout=60, what="created")
        # from now on, the next reconnections of every watch fail while the Job moves on
        faults = {plural: inject(cluster, lambda r, p=plural: _kopf(r) and _watch(r) and _plural(r) == p, WatchFault(kind, 3))
                  for plural in ("finetunejobs", "jobs", "pods")}
        job_controller.add_pod("watched", 0, {"phase": "Running"})
        job_controller.set_status("watched", {"active": 1, "ready": 1})
        wait_phase(cluster, "watched", "Running", timeout=60)
        job_controller.set_status("watched", {"active": 0, "ready": 0, "succeeded": 1,
                                              "conditions": [{"type": "Complete", "status": "True"}]})
        final = wait_phase(cluster, "watched", "Succeeded", timeout=60)
        cluster.wait_for(lambda: all(f.met == f.times for f in faults.values()), timeout=30,
                         what=f"every {kind} watch fault met")
        cluster.create(manifest("later"))  # and the FineTuneJob watch still serves new jobs
        cluster.wait_for(lambda: condition(cluster, "later", ConditionType.CREATED), timeout=30, what="later created")
    assert final["phase"] == "Succeeded"
    assert_children_once(cluster, ["later", "watched"], multi_node=[])


def test_suspend_and_resume_survive_a_failing_job_patch_status_patch_and_event_create(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    """The Job's suspend patch meets a 500 and a 429 with Retry-After, the Suspended transition's
    status write a 500 and a 503, and every Event create a 500 meanwhile (Events are best effort):
    the Job is still suspended and resumed, once each, the phase follows, and the operator goes on."""
    cluster = emulated_cluster
    emulator = cluster.emulator.emulator  # type: ignore[union-attr]

    def job_patches(r: kmock.Request) -> bool:
        return _operator(r) and _method(r) == "PATCH" and _plural(r) == "jobs" and r.subresource is None

    def status_patches(r: kmock.Request) -> bool:
        return _operator(r) and _method(r) == "PATCH" and _plural(r) == "finetunejobs" and r.subresource == "status"

    def event_creates(r: kmock.Request) -> bool:
        return _operator(r) and _method(r) == "POST" and _plural(r) == "events"

    with operator_process(cluster.namespace):
        cluster.create(manifest("pausable"))
        cluster.wait_for(lambda: condition(cluster, "pausable", ConditionType.CREATED), timeout=30, what="created")
        job = cluster.get("batch/v1", "Job", "pausable")
        faults = {
            "job patch 500": inject(cluster, job_patches, Fault(emulator, 500, 1)),
            "job patch 429": inject(cluster, job_patches, Fault(emulator, 429, 1, headers={"Retry-After": "1"})),
            "events 500": inject(cluster, event_creates, Fault(emulator, 500, 2)),
        }
        cluster.patch(*FTJ, "pausable", {"spec": {"runPolicy": {"suspend": True}}})
        cluster.wait_for(lambda: cluster.get("batch/v1", "Job", "pausable")["spec"].get("suspend") is True,
                         timeout=30, what="the Job suspended")
        faults["status 500"] = inject(cluster, status_patches, Fault(emulator, 500, 1))
        faults["status 503"] = inject(cluster, status_patches, Fault(emulator, 503, 1))
        job_controller.suspend("pausable")
        wait_phase(cluster, "pausable", "Suspended", timeout=30)
        cluster.patch(*FTJ, "pausable", {"spec": {"runPolicy": {"suspend": False}}})
        cluster.wait_for(lambda: cluster.get("batch/v1", "Job", "pausable")["spec"].get("suspend") is False,
                         timeout=30, what="the Job resumed")
        job_controller.resume("pausable")
        cluster.wait_for(lambda: (c := condition(cluster, "pausable", ConditionType.SUSPENDED)) and c["status"] == "False",
                         timeout=30, what="Suspended=False")
        cluster.create(manifest("after"))  # the operator still serves new jobs
        cluster.wait_for(lambda: condition(cluster, "after", ConditionType.CREATED), timeout=30, what="after created")
    for what, fault in faults.items():
        assert len(fault.met) == fault.times, (what, len(fault.met))
    assert cluster.get("batch/v1", "Job", "pausable")["metadata"]["uid"] == job["metadata"]["uid"]
    assert_children_once(cluster, ["after", "pausable"], multi_node=[])
    assert status(cluster, "pausable")["phase"] != "Suspended"


SECRET_ECHO = "hf_echoedTOPSECRET0123456789"  # what a 422 may echo of the object it refuses


@pytest.mark.parametrize("refusal", ["quota 403", "invalid 422"])
def test_a_child_create_the_server_refuses_is_reported_on_the_job_without_echo_and_retried(
        emulated_cluster: Cluster, operator_process: Operator, monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    """A create refused for good by the server (a ResourceQuota's 403, an admission policy's 422) is
    no crash: the job says which child and why (a 422 by field path and reason only: its message
    echoes the object's values), one Warning Event, no traceback, no Job; when the server accepts
    again the job goes on with each child made once."""
    monkeypatch.setenv("KUBETUNE_RETRY_DELAY", "1")
    cluster = emulated_cluster
    emulator = cluster.emulator.emulator  # type: ignore[union-attr]
    claims = naming.names_for("refused").claim
    if refusal == "quota 403":
        quota = (f'persistentvolumeclaims "{claims}" is forbidden: exceeded quota: storage, '
                 "requested: requests.storage=50Gi, used: requests.storage=0, limited: requests.storage=10Gi")
        body = _status_body(403, "Forbidden", quota)
        shown = "exceeded quota: storage"
    else:
        body = {**_status_body(422, "Invalid", f'PersistentVolumeClaim "{claims}" is invalid: '
                               f'metadata.labels: Invalid value: "{SECRET_ECHO}"'),
                "details": {"name": claims, "kind": "persistentvolumeclaims", "causes": [
                    {"reason": "FieldValueInvalid", "message": f'Invalid value: "{SECRET_ECHO}"',
                     "field": "metadata.labels"}]}}
        shown = "metadata.labels: FieldValueInvalid"
    fault = inject(cluster, lambda r: _operator(r) and _method(r) == "POST" and _plural(r) == "persistentvolumeclaims",
                   Fault(emulator, body["code"], 3, body=body))
    with operator_process(cluster.namespace) as runner:
        cluster.create(manifest("refused"))
        created = cluster.wait_for(lambda: condition(cluster, "refused", ConditionType.CREATED), timeout=30,
                                   what="the Created condition")
        assert created["status"] == "False" and created["reason"] == Reason.CREATE_REFUSED, created
        assert f"PersistentVolumeClaim {claims}" in created["message"] and shown in created["message"], created
        assert cluster.find("batch/v1", "Job", "refused") is None
        cluster.wait_for(lambda: len(fault.met) == fault.times, timeout=30, what="every refusal met")
        cluster.wait_for(lambda: (c := condition(cluster, "refused", ConditionType.CREATED)) and c["status"] == "True",
                         timeout=30, what="Created once the server accepts")
    refusals = [(t, m) for t, r, m in events(cluster, "refused") if r == Reason.CREATE_REFUSED]
    assert [t for t, _ in refusals] == ["Warning"], refusals  # once, not once per retry
    assert f"PersistentVolumeClaim {claims}" in refusals[0][1] and shown in refusals[0][1], refusals
    assert_children_once(cluster, ["refused"], multi_node=[])
    stored = json.dumps([status(cluster, "refused"), events(cluster, "refused")])
    assert SECRET_ECHO not in stored and SECRET_ECHO not in runner.output


def test_a_finetunejob_deleted_while_its_children_are_made_gets_no_job(
        emulated_cluster: Cluster, operator_process: Operator) -> None:
    """The FineTuneJob is deleted while its ConfigMap's create is slow (retried after a 503): no
    trainer Job is made for a job that is gone (its pods would start training for nobody). The
    children made for it carry its owner reference: the garbage collector removes them (a real
    cluster's also those made after the owner went, which the emulator's does not)."""
    cluster = emulated_cluster
    emulator = cluster.emulator.emulator  # type: ignore[union-attr]
    slow = inject(cluster, lambda r: _operator(r) and _method(r) == "POST" and _plural(r) == "configmaps",
                  Fault(emulator, 503, 1, delay=1.5))
    with operator_process(cluster.namespace):
        cluster.create(manifest("brief"))
        cluster.wait_for(lambda: slow.met, timeout=30, what="the ConfigMap's create under way")
        cluster.delete(*FTJ, "brief")
        cluster.wait_gone(*FTJ, "brief")
        time.sleep(3.0)  # the create is answered, retried and done; the handler has finished
        cluster.create(manifest("next"))
        cluster.wait_for(lambda: condition(cluster, "next", ConditionType.CREATED), timeout=30, what="next created")
    assert cluster.find("batch/v1", "Job", "brief") is None, "a Job was made for a deleted FineTuneJob"
