"""The work queue the events of the operator's Jobs and pods go through (``operator/queueing.py``).

Events of one FineTuneJob collapse into one status decision; an event arriving during a decision
gets one more; an error does not stop the workers; the watch-stream hook notes each event in the
store in stream order and hands kopf a BOOKMARK; a deleted Job of a running job is made again
through the queue; and where the hook cannot install, kopf's handlers do all of it as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Callable
from typing import Any

import kopf
import pytest

from kubetune.api import ConditionType, Reason
from kubetune.operator import creating, handlers, indexing, naming, queueing, statusing, watching
from kubetune.operator.settings import Settings
from tests.operator.operating import JobController, condition, events, manifest, wait_phase
from tests.operator.test_writes import operator_writes
from tests.support.clusters import Cluster

Operator = Callable[..., Any]
Call = tuple[queueing.Key, queueing.Work]


def _recorder(calls: list[Call], gate: asyncio.Event | None = None, started: asyncio.Event | None = None) -> queueing.Reconcile:
    async def reconcile(key: queueing.Key, work: queueing.Work) -> None:
        calls.append((key, work))
        if started is not None:
            started.set()
        if gate is not None:
            await gate.wait()

    return reconcile


def test_events_of_one_owner_collapse_into_one_refresh() -> None:
    async def play() -> list[Call]:
        calls: list[Call] = []
        queue = queueing.WorkQueue(_recorder(calls), workers=2)
        deleted = {"metadata": {"name": "a", "uid": "j1"}}
        queue.add(("ns", "a"))
        queue.add(("ns", "b"))
        queue.add(("ns", "a"), queueing.Work(pod_stopped=True))
        queue.add(("ns", "a"), queueing.Work(deleted_job=deleted, job_deleted=True))
        queue.add(("ns", "a"))
        assert len(queue) == 2
        queue.start()
        await asyncio.wait_for(queue.join(), 5)
        await queue.stop()
        return calls

    calls = asyncio.run(play())
    assert [key for key, _ in calls] == [("ns", "a"), ("ns", "b")]  # in the order first asked for
    work = dict(calls)[("ns", "a")]
    assert work == queueing.Work(deleted_job={"metadata": {"name": "a", "uid": "j1"}}, job_deleted=True, pod_stopped=True)
    assert dict(calls)[("ns", "b")] == queueing.Work()


def test_an_event_during_a_refresh_gets_one_more_refresh_never_two_at_once() -> None:
    async def play() -> tuple[list[Call], int]:
        calls: list[Call] = []
        gate, started = asyncio.Event(), asyncio.Event()
        queue = queueing.WorkQueue(_recorder(calls, gate, started), workers=4)
        queue.start()
        queue.add(("ns", "a"))
        await asyncio.wait_for(started.wait(), 5)
        for _ in range(3):  # arrive while "a" is being reconciled: one more run, not three, and not now
            queue.add(("ns", "a"), queueing.Work(pod_stopped=True))
        await asyncio.sleep(0.05)
        during = len(calls)  # four idle workers, yet "a" is not run a second time concurrently
        gate.set()
        await asyncio.wait_for(queue.join(), 5)
        await queue.stop()
        return calls, during

    calls, during = asyncio.run(play())
    assert during == 1
    assert calls == [(("ns", "a"), queueing.Work()), (("ns", "a"), queueing.Work(pod_stopped=True))]


def test_an_exception_in_one_refresh_does_not_stop_the_workers(caplog: pytest.LogCaptureFixture) -> None:
    async def play() -> list[str]:
        done: list[str] = []

        async def reconcile(key: queueing.Key, work: queueing.Work) -> None:
            if key[1] == "broken":
                raise RuntimeError("a bug in one decision")
            done.append(key[1])

        queue = queueing.WorkQueue(reconcile, workers=1)
        queue.start()
        for name in ("broken", "a", "broken", "b"):
            queue.add(("ns", name))
            await asyncio.sleep(0)
        await asyncio.wait_for(queue.join(), 5)
        queue.add(("ns", "c"))  # the one worker is still there
        await asyncio.wait_for(queue.join(), 5)
        await queue.stop()
        return done

    with caplog.at_level(logging.ERROR, logger="kubetune.operator.queueing"):
        assert asyncio.run(play()) == ["a", "b", "c"]
    failures = [r for r in caplog.records if "ns/broken failed with an exception" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)


def test_a_temporary_error_is_tried_again_after_its_delay_with_what_was_asked() -> None:
    async def play() -> list[Call]:
        calls: list[Call] = []

        async def reconcile(key: queueing.Key, work: queueing.Work) -> None:
            calls.append((key, work))
            if len(calls) == 1:
                raise kopf.TemporaryError("the API server failed", delay=0.1)

        queue = queueing.WorkQueue(reconcile, workers=1)
        queue.start()
        queue.add(("ns", "a"), queueing.Work(job_deleted=True))
        await asyncio.sleep(0.5)
        await queue.stop()
        return calls

    calls = asyncio.run(play())
    assert calls == [(("ns", "a"), queueing.Work(job_deleted=True))] * 2


def test_stopping_cancels_the_workers_and_a_pending_retry() -> None:
    async def play() -> tuple[bool, int]:
        calls: list[Call] = []
        gate = asyncio.Event()
        queue = queueing.WorkQueue(_recorder(calls, gate), workers=3)
        queue.start()
        queue.add(("ns", "a"))
        await asyncio.sleep(0.01)
        queue._add_later(0.05, ("ns", "b"), queueing.Work())
        tasks = list(queue._tasks)
        await asyncio.wait_for(queue.stop(), 5)  # one worker is inside a reconcile: cancelled too
        await asyncio.sleep(0.1)
        return all(t.done() for t in tasks) and not queue.running, len(calls)

    assert asyncio.run(play()) == (True, 1)


def _job_event(kind: str, name: str, uid: str, version: str, **status: Any) -> dict[str, Any]:
    return {"type": kind, "object": {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
        "name": name, "namespace": "ns", "uid": uid, "resourceVersion": version,
        "labels": {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}, "annotations": {naming.ANNOTATION_JOB: name}},
        "spec": {"completions": 1}, "status": status}}


def _pod_event(kind: str, job: str, uid: str, version: str, phase: str) -> dict[str, Any]:
    return {"type": kind, "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{job}-0-x", "namespace": "ns", "uid": uid, "resourceVersion": version,
        "labels": {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}, "annotations": {naming.ANNOTATION_JOB: job}},
        "status": {"phase": phase}}}


JOBS = types.SimpleNamespace(group="batch", version="v1", plural="jobs")
PODS = types.SimpleNamespace(group="", version="v1", plural="pods")


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``creating.restore_job`` replaced by a recorder of the (namespace, name) it is called for."""
    calls: list[tuple[str, str]] = []

    async def restore_job(namespace: str, name: str, settings: Settings) -> bool:
        calls.append((namespace, name))
        return True

    monkeypatch.setattr(creating, "restore_job", restore_job)
    return calls


def _start_queue() -> queueing.WorkQueue:
    """The operator's work queue, as ``handlers.start_queue`` makes it, running in this loop."""
    queue = queueing.WorkQueue(handlers._reconciler(Settings.from_env({})))
    handlers._queues[asyncio.get_running_loop()] = queue
    queue.start()
    return queue


def test_the_hook_notes_in_stream_order_and_a_deleted_job_reaches_refresh_and_restore(
        monkeypatch: pytest.MonkeyPatch, restored: list[tuple[str, str]]) -> None:
    refreshed: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None, int]] = []

    async def refresh(namespace: str, name: str, seen: indexing.Seen | None = None, *,
                      deleted_job: dict[str, Any] | None = None) -> str | None:
        assert seen is not None
        refreshed.append((namespace, name, seen.job(namespace, name), deleted_job, len(seen.pods_of(namespace, name))))
        return None

    monkeypatch.setattr(statusing, "refresh", refresh)

    async def play() -> list[bool]:
        queue = _start_queue()
        taken = [
            handlers.queue_child_event(JOBS, _job_event("ADDED", "a", "j1", "5")),
            handlers.queue_child_event(PODS, _pod_event("ADDED", "a", "p1", "6", "Running")),
            handlers.queue_child_event(JOBS, _job_event("MODIFIED", "a", "j1", "7", active=1)),
        ]
        await asyncio.wait_for(queue.join(), 5)
        store = indexing.store()
        assert store.jobs[("ns", "a")]["j1"]["status"] == {"active": 1}  # noted at once, newest last
        # A deletion is queued and still goes on to kopf (which forgets the object), marked: the
        # kopf handler returns at once.
        deletion = _job_event("DELETED", "a", "j1", "8", active=1)
        taken.append(handlers.queue_child_event(JOBS, deletion))
        assert deletion[handlers.QUEUED] is True
        await asyncio.wait_for(queue.join(), 5)
        await handlers.follow_job(event=deletion, body=kopf.Body(deletion["object"]), namespace="ns",
                                  memo=kopf.Memo(settings=Settings.from_env({})))
        # Not the operator's, or not an event kopf's handlers would run for: kopf decides, as before.
        foreign = _job_event("MODIFIED", "b", "j2", "9")
        foreign["object"]["metadata"]["labels"] = {}
        taken.append(handlers.queue_child_event(JOBS, foreign))
        taken.append(handlers.queue_child_event(types.SimpleNamespace(group="", plural="configmaps"),
                                                _job_event("ADDED", "a", "c1", "9")))
        await handlers.stop_queue()
        taken.append(handlers.queue_child_event(JOBS, _job_event("MODIFIED", "a", "j3", "10")))  # no queue now
        return taken

    assert asyncio.run(play()) == [True, True, True, False, False, False, False]
    # The three first events: one or two decisions, the last one seeing both the Job (as last noted) and the pod.
    assert refreshed[-2][2] is not None and refreshed[-2][2]["status"] == {"active": 1} and refreshed[-2][4] == 1
    assert len(refreshed) <= 3 and all(deleted is None for *_, deleted, _ in refreshed[:-1])
    # The deletion: no Job left in the store, the deleted body handed to refresh, the Job restored.
    namespace, name, job, deleted, _ = refreshed[-1]
    assert (namespace, name, job) == ("ns", "a", None)
    assert deleted is not None and deleted["metadata"]["uid"] == "j1"
    assert restored == [("ns", "a")]  # once: the marked event did nothing more in kopf's handler


def test_a_stopped_pod_restores_only_when_no_job_is_seen(monkeypatch: pytest.MonkeyPatch,
                                                         restored: list[tuple[str, str]]) -> None:

    async def refresh(namespace: str, name: str, seen: indexing.Seen | None = None, **_: Any) -> str | None:
        return None

    monkeypatch.setattr(statusing, "refresh", refresh)

    async def play() -> None:
        queue = _start_queue()
        handlers.queue_child_event(JOBS, _job_event("ADDED", "kept", "j1", "1"))
        handlers.queue_child_event(PODS, _pod_event("MODIFIED", "kept", "p1", "2", "Succeeded"))
        handlers.queue_child_event(PODS, _pod_event("MODIFIED", "gone", "p2", "3", "Failed"))  # its Job is not seen
        handlers.queue_child_event(PODS, _pod_event("MODIFIED", "running", "p3", "4", "Running"))
        await asyncio.wait_for(queue.join(), 5)
        await handlers.stop_queue()

    asyncio.run(play())
    assert restored == [("ns", "gone")]


def test_the_store_keeps_the_newest_version_and_forgets_nothing_deleted() -> None:
    # kopf's handlers (its listing at start-up) may note an event after the hook noted a later one.
    store = indexing.Store()
    store.note_job("ns", _job_event("", "a", "j1", "7", active=1)["object"], deleted=False)
    store.note_job("ns", _job_event("", "a", "j1", "5")["object"], deleted=False)
    assert store.jobs[("ns", "a")]["j1"]["status"] == {"active": 1}
    store.note_job("ns", _job_event("", "a", "j1", "8")["object"], deleted=True)
    store.note_job("ns", _job_event("", "a", "j1", "6")["object"], deleted=False)  # late: still gone
    assert ("ns", "a") not in store.jobs


def test_taking_falls_back_to_kopf_where_it_cannot_install(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    def watch_objs(*, resource: Any) -> None:  # not an async generator any more
        return None

    fake = types.SimpleNamespace(watch_objs=watch_objs, continuous_watch=lambda: None)
    monkeypatch.setattr(watching, "_watching_module", lambda: fake)
    monkeypatch.setattr(watching, "_take", None)
    assert watching.install_taking(lambda resource, event: True) is False
    assert fake.watch_objs is watch_objs and watching._take is None
    assert any("the events of the operator's Jobs and pods go through kopf's handlers" in r.getMessage()
               for r in caplog.records)


def _play_and_delete_the_job(cluster: Cluster, job_controller: JobController, name: str) -> None:
    cluster.create(manifest(name))
    cluster.wait_for(lambda: condition(cluster, name, ConditionType.CREATED), what=f"{name} created")
    job_controller.add_pod(name, 0, {"phase": "Running", "containerStatuses": [{
        "name": "trainer", "restartCount": 0, "ready": True, "image": "x", "imageID": "", "state": {"running": {}}}]})
    job_controller.set_status(name, {"active": 1, "ready": 1, "startTime": "2026-01-01T00:00:00Z"})
    wait_phase(cluster, name, "Running")
    old = cluster.get("batch/v1", "Job", name)
    cluster.delete("batch/v1", "Job", name, propagation_policy="Background")
    cluster.wait_for(lambda: (j := cluster.find("batch/v1", "Job", name)) and j["metadata"]["uid"] != old["metadata"]["uid"],
                     timeout=30, what="a new Job")
    cluster.wait_for(lambda: any(reason == Reason.JOB_RECREATED for _, reason, _ in events(cluster, name)),
                     timeout=15, what="the JobRecreated Event")
    time.sleep(1.0)


@pytest.mark.parametrize("hooked", [True, False], ids=["through-the-queue", "kopf-fallback"])
def test_a_deleted_job_is_made_again_through_the_queue_or_by_kopf_where_the_hook_is_missing(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController,
        monkeypatch: pytest.MonkeyPatch, hooked: bool) -> None:
    taken: list[tuple[str, str]] = []
    install_taking = watching.install_taking

    def counting_install_taking(take: watching.Take) -> bool:
        def counted(resource: Any, event: Any) -> bool:
            was_taken = take(resource, event)
            if was_taken or event.get(handlers.QUEUED):  # a deletion goes on to kopf, marked as queued
                taken.append((event["object"]["kind"], event["type"]))
            return was_taken

        if not hooked:  # as on a kopf whose watch streams moved: nothing offered to the queue
            monkeypatch.setattr(watching, "_take", None)
            return False
        return install_taking(counted)

    monkeypatch.setattr(watching, "install_taking", counting_install_taking)
    monkeypatch.setattr(watching, "_take", watching._take)  # put back after the test
    refresh = statusing.refresh
    with_deleted_job: list[str] = []

    async def counting_refresh(namespace: str, name: str, seen: Any = None, **kwargs: Any) -> str | None:
        if kwargs.get("deleted_job") is not None:
            with_deleted_job.append(kwargs["deleted_job"]["metadata"]["name"])
        return await refresh(namespace, name, seen, **kwargs)

    monkeypatch.setattr(statusing, "refresh", counting_refresh)
    cluster, name = emulated_cluster, "requeued"
    with operator_process(cluster.namespace):
        _play_and_delete_the_job(cluster, job_controller, name)
        writes = operator_writes(cluster)
    assert writes["patch finetunejobs"] == 0, writes
    assert with_deleted_job == [name]  # once: by the queue, or by kopf's handler, never both
    recreated = [e for e in events(cluster, name) if e[1] == Reason.JOB_RECREATED]
    assert len(recreated) == 1, recreated
    if hooked:
        # Every event of the Job and pod went through the queue, its deletion among them; kopf saw none.
        assert ("Job", "ADDED") in taken and ("Job", "DELETED") in taken and ("Pod", "ADDED") in taken, taken
        # One decision per FineTuneJob at a time: the Job's and the pod's deletion never restore at
        # once, and the later one reads the new Job; one Job create after the first.
        assert writes["create jobs"] == 2, writes
    else:
        assert taken == []
        # kopf's handlers for the Job and the pod may both find the Job gone at once: the second
        # create is answered 409 (no second Job, no second Event), as on main.
        assert writes["create jobs"] in (2, 3), writes
