"""The validating webhook refuses bad FineTuneJobs at ``kubectl apply`` with every problem and its
field path, and refuses an update of an immutable field (only runPolicy may change)."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from kubetune.operator import admitting, handlers, kubeapi, running
from kubetune.operator.settings import Settings, webhook_ignores_failures
from tests.operator.operating import manifest


def _bad() -> dict[str, Any]:
    body = manifest("bad", peft={"method": "lora", "r": -4}, resources={"nodes": 2})
    body["spec"]["training"]["learningRate"] = "fast"
    return body


def test_every_problem_is_returned_with_its_field_path() -> None:
    paths = {p.path for p in admitting.review(_bad())}
    assert {"spec.peft.r", "spec.training.learningRate"} <= paths


def test_the_handler_refuses_with_422_and_the_paths() -> None:
    with pytest.raises(kopf.AdmissionError) as refused:
        handlers.admit(body=kopf.Body(_bad()), operation="CREATE", old=None)
    assert refused.value.code == 422
    message = str(refused.value)
    assert "spec.peft.r: must be >= 1 (got -4)" in message and "spec.training.learningRate" in message


def test_a_valid_job_and_a_run_policy_change_are_admitted() -> None:
    old = manifest("good")
    handlers.admit(body=kopf.Body(old), operation="CREATE", old=None)
    new = copy.deepcopy(old)
    new["spec"]["runPolicy"] = {"suspend": True, "backoffLimit": 2}
    handlers.admit(body=kopf.Body(new), operation="UPDATE", old=kopf.Body(old))


@pytest.mark.parametrize("block, value", [
    ("model", {"source": "hf://other/model"}),
    ("training", {"maxSteps": 500}),
    ("output", {"path": "/workspace/elsewhere"}),
])
def test_an_update_of_an_immutable_field_is_refused(block: str, value: dict[str, Any]) -> None:
    old = manifest("live")
    new = copy.deepcopy(old)
    new["spec"][block] = value
    with pytest.raises(kopf.AdmissionError) as refused:
        handlers.admit(body=kopf.Body(new), operation="UPDATE", old=kopf.Body(old))
    assert f"spec.{block}: cannot change after creation" in str(refused.value)


def test_the_webhook_server_is_on_only_with_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubeapi, "connect", lambda *a, **k: None)  # no cluster needed to configure
    off = kopf.OperatorSettings()
    running.configure(off, kopf.Memo(settings=Settings()))
    assert off.admission.server is None
    on = kopf.OperatorSettings()
    running.configure(on, kopf.Memo(settings=Settings(webhook_port=9443, webhook_host="kubetune-webhook.ops.svc")))
    assert isinstance(on.admission.server, kopf.WebhookServer) and on.admission.server.port == 9443
    assert on.admission.server.host == "kubetune-webhook.ops.svc"
    assert on.admission.managed == "finetunejobs.kubetune.io"


def test_failure_policy_comes_from_the_environment() -> None:
    assert webhook_ignores_failures({}) is False
    assert webhook_ignores_failures({"KUBETUNE_WEBHOOK_FAILURE_POLICY": "Ignore"}) is True
    with pytest.raises(ValueError, match="WEBHOOK_FAILURE_POLICY"):
        Settings.from_env({"KUBETUNE_WEBHOOK_FAILURE_POLICY": "Sometimes"})


def test_the_admission_handler_is_registered_only_with_the_webhook_on() -> None:
    from kubetune.operator.settings import webhook_enabled

    assert webhook_enabled({}) is False and webhook_enabled({"KUBETUNE_WEBHOOK_PORT": "0"}) is False
    assert webhook_enabled({"KUBETUNE_WEBHOOK_PORT": "9443"}) is True
