"""The operator's two hooks into kopf's watch streams (``operator/watching.py``): they install on the
kopf in use and fail this test loudly when kopf's internals move; faster decoding decodes what the
standard library decodes; the operator's own status writes coming back are absorbed before kopf
processes them, with the store, the jobs-by-phase gauge, the writes and the status as before."""

from __future__ import annotations

import asyncio
import json
import time
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import watching as kopf_watching

from kubetune.api import ConditionType
from kubetune.operator import decoding, kubeapi, metrics, naming, statusing, watching
from tests.operator.operating import JobController, condition, manifest, wait_event, wait_phase
from tests.operator.test_writes import operator_writes
from tests.support.clusters import Cluster

Operator = Callable[..., Any]


def test_both_hooks_install_on_the_kopf_in_use() -> None:
    # If this fails after a kopf upgrade, kopf's watch streams moved: the operator still runs
    # (install leaves kopf alone and warns), but every event costs what it did before.
    assert watching.install(lambda resource, event: False) == {"decoding": True, "absorbing": True}
    assert kopf_api.json.loads is decoding.loads
    assert kopf_api.json.JSONDecodeError is json.JSONDecodeError  # the rest is the standard library
    assert getattr(kopf_watching.watch_objs, "_kubetune_absorbing", False)
    assert watching.install(lambda resource, event: False) == {"decoding": True, "absorbing": True}  # idempotent
    assert not getattr(kopf_watching.watch_objs.__wrapped__, "_kubetune_absorbing", False)  # wrapped once


def test_a_kopf_shaped_otherwise_is_left_alone(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def stream() -> None:
        return None  # no json.loads here: kopf decodes elsewhere

    fake_api = types.SimpleNamespace(json=json, stream=stream)
    monkeypatch.setattr(watching, "_api_module", lambda: fake_api)
    assert watching.install_decoding() is False
    assert fake_api.json is json

    def watch_objs(*, resource: Any) -> None:  # not an async generator any more
        return None

    def continuous_watch() -> None:
        watch_objs(resource=None)  # "BOOKMARK"

    fake_watching = types.SimpleNamespace(watch_objs=watch_objs, continuous_watch=continuous_watch)
    monkeypatch.setattr(watching, "_watching_module", lambda: fake_watching)
    assert watching.install_absorbing(lambda resource, event: True) is False
    assert fake_watching.watch_objs is watch_objs
    assert sum("kopf's watch streams are not" in r.getMessage() for r in caplog.records) == 2


DOCUMENTS = [
    '{"kind": "Job", "metadata": {"name": "a", "labels": {"x": "y"}}, "spec": {"completions": 1}}',
    '{"message": "naïve \\u00e9 ✓ \\ud83d\\ude00", "list": [1, 2.5, -3e-05, true, false, null]}',
    '{"edges": [9223372036854775807, -9223372036854775808, 18446744073709551615, -0.0, 1.7976931348623157e308]}',
    '{"inf": 1e400}',  # orjson refuses, the stdlib takes it as infinity
    '{"nan": NaN, "inf": Infinity}',  # not JSON; the stdlib takes it, so the operator still does
    '{"lone": "\\ud800"}',  # a lone surrogate: the stdlib takes it
    '{"dup": 1, "dup": 2}',
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_decoding_decodes_what_the_standard_library_decodes(text: str) -> None:
    expected = json.loads(text)
    for data in (text, text.encode()):
        got = decoding.loads(data)
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    got = decoding.loads(text.encode("utf-16"))  # not orjson's: the stdlib detects the encoding
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize("text", ['{"a": ', "", "[1, 2", '{"a" 1}'])
def test_decoding_refuses_what_the_standard_library_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(ValueError):
        decoding.loads(text)


def test_encoding_is_compact_json_the_standard_library_reads_back() -> None:
    body = {"status": {"phase": "Running", "message": "naïve ✓", "conditions": [{"type": "Created", "n": 1.5e-07}]},
            "big": 2 ** 70}
    assert json.loads(decoding.dumps(body)) == body
    assert b" " not in decoding.dumps({"a": [1, 2], "b": {"c": None}})
    assert json.loads(decoding.dumps({1: "a"})) == {"1": "a"}  # non-string keys as the stdlib writes them
    with pytest.raises(TypeError):
        decoding.dumps({"a": object()})


async def _collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


def _fake_kopf_watching(monkeypatch: pytest.MonkeyPatch, events: list[Any]) -> Any:
    """kopf's watching module as ``install_absorbing`` checks it: ``watch_objs`` streams ``events``."""

    async def watch_objs(*, settings: Any, resource: Any, namespace: Any) -> AsyncIterator[Any]:
        for event in events:
            yield event

    async def continuous_watch() -> AsyncIterator[Any]:  # the caller as kopf writes it
        async for raw in watch_objs(settings=None, resource=None, namespace=None):
            if raw["type"] == "BOOKMARK":
                yield raw

    fake = types.SimpleNamespace(watch_objs=watch_objs, continuous_watch=continuous_watch)
    monkeypatch.setattr(watching, "_watching_module", lambda: fake)
    monkeypatch.setattr(watching, "_absorb", None)
    return fake


def test_an_absorbed_event_reaches_kopf_as_a_bookmark_of_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [
        {"type": "ADDED", "object": {"kind": "FineTuneJob", "metadata": {"name": "a", "resourceVersion": "1"}}},
        {"type": "MODIFIED", "object": {"kind": "FineTuneJob", "apiVersion": "kubetune.io/v1alpha1",
                                        "metadata": {"name": "a", "resourceVersion": "2"}, "status": {"phase": "Running"}}},
        {"type": "MODIFIED", "object": {"kind": "FineTuneJob", "metadata": {"name": "a", "resourceVersion": "3"}}},
        {"type": "DELETED", "object": {"kind": "FineTuneJob", "metadata": {"name": "a", "resourceVersion": "2"}}},
    ]
    fake = _fake_kopf_watching(monkeypatch, events)
    seen: list[tuple[Any, str]] = []

    def absorb(resource: Any, event: Any) -> bool:
        seen.append((resource, event["object"]["metadata"]["resourceVersion"]))
        return event["object"]["metadata"]["resourceVersion"] == "2"

    assert watching.install_absorbing(absorb)
    got = asyncio.run(_collect(fake.watch_objs(settings=None, resource="ftj", namespace="ns")))
    assert got[0] is events[0] and got[2] is events[2] and got[3] is events[3]
    assert got[1] == {"type": "BOOKMARK", "object": {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                                     "metadata": {"resourceVersion": "2"}}}
    assert seen == [("ftj", "2"), ("ftj", "3")]  # only MODIFIED events are offered


def test_an_absorb_that_fails_leaves_the_event_to_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    event = {"type": "MODIFIED", "object": {"kind": "FineTuneJob", "metadata": {"name": "a", "resourceVersion": "2"}}}
    fake = _fake_kopf_watching(monkeypatch, [event])

    def absorb(resource: Any, raw: Any) -> bool:
        raise KeyError("a bug in noting the write")

    assert watching.install_absorbing(absorb)
    got = asyncio.run(_collect(fake.watch_objs(settings=None, resource="ftj", namespace="ns")))
    assert got == [event]  # the stream goes on, and kopf processes the event as it would have

def test_the_operators_own_status_writes_are_absorbed_with_nothing_else_changed(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController,
        monkeypatch: pytest.MonkeyPatch) -> None:
    absorbed: list[str] = []
    install = watching.install

    def counting_install(absorb: watching.Absorb) -> dict[str, bool]:
        def counted(resource: Any, event: Any) -> bool:
            taken = absorb(resource, event)
            if taken:
                absorbed.append(event["object"]["status"].get("phase"))
            return taken

        return install(counted)

    monkeypatch.setattr(watching, "install", counting_install)
    cluster, name = emulated_cluster, "echoed"
    job = naming.names_for(name).job
    with operator_process(cluster.namespace):
        cluster.create(manifest(name))
        cluster.wait_for(lambda: condition(cluster, name, ConditionType.CREATED))
        job_controller.add_pod(job, 0, {"phase": "Pending"})
        job_controller.set_status(job, {"startTime": "2026-01-01T00:00:00Z", "active": 1, "ready": 1})
        cluster.patch("v1", "Pod", f"{job}-0-abcde", {"status": {"phase": "Running", "containerStatuses": [
            {"name": "trainer", "ready": True, "restartCount": 0, "state": {"running": {}}}]}}, subresource="status")
        wait_phase(cluster, name, "Running")
        time.sleep(1.0)
        # the gauge counts the job as Running though kopf never saw that phase
        assert metrics.JOBS_BY_PHASE.labels(phase="Running")._value.get() == 1
        job_controller.set_status(job, {"active": 0, "ready": 0, "succeeded": 1, "completionTime": "2026-01-01T00:05:00Z",
                                        "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                                                       {"type": "Complete", "status": "True"}]})
        wait_phase(cluster, name, "Succeeded")
        wait_event(cluster, name, "JobSucceeded")
        time.sleep(1.0)
        writes = operator_writes(cluster)
        assert metrics.JOBS_BY_PHASE.labels(phase="Succeeded")._value.get() == 1
        assert metrics.JOBS_BY_PHASE.labels(phase="Running")._value.get() == 0
    # Each of the three status writes came back once and went no further than absorb_own_write.
    assert absorbed == ["Initializing", "Running", "Succeeded"], absorbed
    assert writes["patch finetunejobs/status"] == 3 and writes["create events"] == 2, writes
    assert writes["patch finetunejobs"] == 0, writes


def test_every_own_write_is_recognised_once_even_after_a_newer_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lagging operator writes Running and Succeeded before the first write's event comes back:
    # both events are its own writes, each recognised once; a version it did not write is not.
    versions = iter(["11", "12", "13"])

    async def patch(kind: str, namespace: str, name: str, body: Any, subresource: str | None = None) -> Any:
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": next(versions)},
                "status": body["status"]}

    monkeypatch.setattr(kubeapi, "patch", patch)
    ftj = {"metadata": {"name": "lagging", "namespace": "ns", "resourceVersion": "10"}}

    async def play() -> list[bool]:
        await statusing.write_status(ftj, {"phase": "Running"}, guarded=False)
        await statusing.write_status(ftj, {"phase": "Succeeded"}, guarded=False)
        taken = [statusing.take_echo("ns", "lagging", v) for v in ("10", "11", "11", "12")]
        await statusing.write_status(ftj, {"phase": "Failed"}, guarded=False)
        statusing.forget("ns", "lagging")  # deleted: its writes still to come back are forgotten
        return [*taken, statusing.take_echo("ns", "lagging", "13")]

    assert asyncio.run(play()) == [False, True, False, True, False]


def test_own_writes_passed_by_the_watch_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    # The event of a write can win the race with the write's answer: its version, recorded after,
    # is dropped once a later version of the job comes by, so nothing accumulates.
    versions = iter(["21", "22"])

    async def patch(kind: str, namespace: str, name: str, body: Any, subresource: str | None = None) -> Any:
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": next(versions)}}

    monkeypatch.setattr(kubeapi, "patch", patch)
    ftj = {"metadata": {"name": "raced", "namespace": "ns", "resourceVersion": "20"}}

    async def play() -> tuple[list[bool], bool]:
        await statusing.write_status(ftj, {"phase": "Running"}, guarded=False)
        await statusing.write_status(ftj, {"phase": "Succeeded"}, guarded=False)
        taken = [statusing.take_echo("ns", "raced", "23"), statusing.take_echo("ns", "raced", "22")]
        return taken, ("ns", "raced") in statusing._echoes[asyncio.get_running_loop()]

    assert asyncio.run(play()) == ([False, False], False)
