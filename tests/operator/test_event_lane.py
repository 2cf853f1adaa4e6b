"""Events in a lane of their own (``kubeapi.EventLane``): the caller does not wait for them, each
object's Events reach the API server in the order they were posted, what is waiting is written
when the operator stops, and a backlog that cannot be written stops growing.

Against the emulator over loopback HTTP, through the gateway, as the operator posts them.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune.operator import kubeapi
from tests.support.emulating import EmulatorThread


@pytest.fixture()
def gateway(k8s_emulator: EmulatorThread, kubeconfig_file: pathlib.Path) -> Iterator[EmulatorThread]:
    kubeapi.connect()
    try:
        yield k8s_emulator
    finally:
        kubeapi.close()


def _ftj(name: str) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"}}


async def test_events_go_out_behind_the_caller_in_order_per_object(gateway: EmulatorThread,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()
    request = kubeapi._request  # noqa: SLF001

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await release.wait()  # a busy API server: nothing is answered until released
        return await request(*args, **kwargs)

    monkeypatch.setattr(kubeapi, "_request", slow)
    lane = kubeapi.start_event_lane()
    for step in range(5):
        for name in ("a", "b", "c"):
            # returns at once although no Event can be written yet
            await asyncio.wait_for(kubeapi.post_event(_ftj(name), reason=f"Step{step}", message=f"{name} step {step}"), 1)
    assert len(lane) >= 15 - kubeapi.EVENT_WRITERS and gateway.list_objects("v1/events", "default") == []
    release.set()
    await kubeapi.stop_event_lane()  # writes what waits
    events = sorted(gateway.list_objects("v1/events", "default"), key=lambda e: int(e["metadata"]["resourceVersion"]))
    assert len(events) == 15
    for name in ("a", "b", "c"):
        assert [e["reason"] for e in events if e["involvedObject"]["name"] == name] == [f"Step{i}" for i in range(5)]


async def test_without_a_lane_an_event_is_written_before_post_event_returns(gateway: EmulatorThread) -> None:
    await kubeapi.post_event(_ftj("x"), reason="Inline", message="no lane in this loop")
    assert [e["reason"] for e in gateway.list_objects("v1/events", "default")] == ["Inline"]


async def test_stopping_waits_a_bounded_time_and_says_what_was_not_written(
        gateway: EmulatorThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def hung(*_: Any, **__: Any) -> Any:
        await asyncio.Event().wait()  # an API server that never answers

    monkeypatch.setattr(kubeapi, "_request", hung)
    kubeapi.start_event_lane()
    for i in range(10):
        await kubeapi.post_event(_ftj(f"j{i}"), reason="Waiting", message="never written")
    with caplog.at_level(logging.WARNING, logger="kubetune.operator.kubeapi"):
        await asyncio.wait_for(kubeapi.stop_event_lane(timeout=0.2), 5)
    assert any("Events not written: the operator is stopping" in r.getMessage() for r in caplog.records), caplog.text


async def test_a_backlog_that_cannot_be_written_stops_growing(
        gateway: EmulatorThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def hung(*_: Any, **__: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(kubeapi, "_request", hung)
    monkeypatch.setattr(kubeapi, "EVENT_BACKLOG", 10)
    lane = kubeapi.start_event_lane()
    with caplog.at_level(logging.WARNING, logger="kubetune.operator.kubeapi"):
        for i in range(30):
            await kubeapi.post_event(_ftj(f"j{i}"), reason="Flood", message="refused")
            await asyncio.sleep(0)
    assert len(lane) <= 10 and lane.dropped >= 30 - 10 - kubeapi.EVENT_WRITERS
    assert any("Events dropped" in r.getMessage() for r in caplog.records), caplog.text
    await kubeapi.stop_event_lane(timeout=0.1)
