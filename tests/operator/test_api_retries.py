"""The API gateway repeats a request that failed transiently (tenacity), and only such a request."""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import kmock
import pytest

from kubetune.operator import kubeapi, metrics
from tests.support.emulating import EmulatorThread

CONFIGMAPS = kmock.resource("", "v1", "configmaps")
JOBS = kmock.resource("batch", "v1", "jobs")


@pytest.fixture()
def gateway(k8s_emulator: EmulatorThread, kubeconfig_file: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    monkeypatch.setattr(kubeapi, "RETRY_WAIT_MIN", 0.01)
    monkeypatch.setattr(kubeapi, "RETRY_WAIT_MAX", 0.05)
    assert os.environ["KUBECONFIG"] == str(kubeconfig_file)
    kubeapi.connect()  # reads KUBECONFIG, as the operator does
    k8s_emulator.create_object("v1/configmaps", "default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    k8s_emulator.create_object("batch/v1/jobs", "default", {"metadata": {"name": "job"}, "spec": {"suspend": False}})
    try:
        yield k8s_emulator
    finally:
        kubeapi.close()


def _errors(verb: str, status: str, resource: str = "configmaps") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "kubetune_api_errors_total", {"verb": verb, "resource": resource, "status": status})
    return value or 0.0


async def test_unavailable_server_is_retried_until_it_answers(gateway: EmulatorThread) -> None:
    emulator = gateway.emulator
    assert emulator is not None
    before = _errors("get", "503")
    emulator["get", CONFIGMAPS][:2] << 503 << {"kind": "Status", "code": 503, "message": "restarting"}
    found = await kubeapi.get("ConfigMap", "default", "cm")
    assert found is not None and found["data"] == {"a": "1"}
    assert _errors("get", "503") - before == 2  # each failed attempt is still counted


async def test_retries_stop_after_the_last_attempt(gateway: EmulatorThread) -> None:
    emulator = gateway.emulator
    assert emulator is not None
    emulator["patch", JOBS] << 429 << {"kind": "Status", "code": 429, "message": "slow down"}
    before = _errors("patch", "429", "jobs")
    with pytest.raises(kubeapi.ApiError) as raised:
        await kubeapi.patch("Job", "default", "job", {"spec": {"suspend": True}})
    assert raised.value.status == 429
    assert _errors("patch", "429", "jobs") - before == kubeapi.RETRY_ATTEMPTS


async def test_a_refused_request_is_not_repeated(gateway: EmulatorThread) -> None:
    emulator = gateway.emulator
    assert emulator is not None
    emulator["patch", JOBS] << 500 << {"kind": "Status", "code": 500, "message": "broken"}
    before = _errors("patch", "500", "jobs")
    with pytest.raises(kubeapi.ApiError) as raised:
        await kubeapi.patch("Job", "default", "job", {"spec": {"suspend": True}})
    assert raised.value.status == 500
    assert _errors("patch", "500", "jobs") - before == 1  # kopf retries the handler, not the gateway the request


async def test_retry_after_is_honoured(gateway: EmulatorThread) -> None:
    """A 429 with Retry-After (API priority and fairness) is not retried sooner than it asks."""
    import time

    emulator = gateway.emulator
    assert emulator is not None
    emulator["get", CONFIGMAPS][:1] << 429 << kmock.headers({"Retry-After": "1"}) << {"kind": "Status", "code": 429, "message": "wait"}
    started = time.monotonic()
    found = await kubeapi.get("ConfigMap", "default", "cm")
    assert found is not None and time.monotonic() - started >= 0.95


def test_retry_after_is_read_in_seconds_and_capped() -> None:
    assert kubeapi.retry_after(kubeapi.ApiError(429)) is None
    exc = kubeapi.ApiError(429)
    exc.headers = {"Retry-After": "3"}
    assert kubeapi.retry_after(exc) == 3.0
    exc.headers = {"Retry-After": "86400"}
    assert kubeapi.retry_after(exc) == kubeapi.RETRY_AFTER_MAX
    exc.headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    assert kubeapi.retry_after(exc) is None


async def test_a_422_is_shown_by_field_path_without_the_values_it_echoes(gateway: EmulatorThread) -> None:
    """A 422's message quotes what it refuses (``Invalid value: "…"``): a credential in the object
    would reach the logs, Events and conditions that show the error. Only field paths and reasons do."""
    emulator = gateway.emulator
    assert emulator is not None
    echoed = "hf_echoedTOPSECRET0123456789"
    emulator["patch", JOBS][:1] << 422 << {
        "kind": "Status", "code": 422, "reason": "Invalid",
        "message": f'Job.batch "job" is invalid: spec.template.metadata.labels: Invalid value: "{echoed}"',
        "details": {"causes": [{"reason": "FieldValueInvalid", "message": f'Invalid value: "{echoed}"',
                                "field": "spec.template.metadata.labels"}]}}
    with pytest.raises(kubeapi.ApiError) as raised:
        await kubeapi.patch("Job", "default", "job", {"spec": {"suspend": True}})
    shown = str(raised.value)
    assert raised.value.status == 422 and "spec.template.metadata.labels: FieldValueInvalid" in shown, shown
    assert echoed not in shown and echoed not in repr(raised.value) and echoed not in kubeapi.describe_failure(raised.value)
    # other refusals keep the server's message: it is what a person acts on (quota, RBAC)
    emulator["patch", JOBS] << 403 << {"kind": "Status", "code": 403, "message": "exceeded quota: q"}
    with pytest.raises(kubeapi.ApiError) as refused:
        await kubeapi.patch("Job", "default", "job", {"spec": {"suspend": True}})
    assert "exceeded quota: q" in str(refused.value)


async def test_a_create_whose_answer_times_out_is_retried_and_makes_one_object(
        gateway: EmulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server makes the object but its answer never comes in time (a timeout): the gateway
    tries again, meets 409 AlreadyExists and reads the object back; one object, no error."""
    emulator = gateway.emulator
    assert emulator is not None
    monkeypatch.setattr(kubeapi, "REQUEST_TIMEOUT", 0.3)

    async def slow(request: kmock.Request) -> Any:
        emulator._serve_resource_request(request)  # type: ignore[attr-defined]  # the create lands
        await asyncio.sleep(1.5)  # and its answer comes after the client's timeout
        return kmock.Response(status=500, payload={"kind": "Status", "code": 500, "message": "too late"})

    emulator["post", CONFIGMAPS][:1] << slow
    before = _errors("create", "0")
    made, created = await kubeapi.create({"apiVersion": "v1", "kind": "ConfigMap",
                                          "metadata": {"name": "late", "namespace": "default"}, "data": {"b": "2"}})
    assert not created and made["data"] == {"b": "2"}  # found made by the first try
    assert _errors("create", "0") - before == 1  # the timeout, counted as no answer
    assert [c["metadata"]["name"] for c in gateway.list_objects("v1/configmaps", "default")].count("late") == 1
