"""The chart turns the operator's validating webhook on: env for kopf's webhook server, the port,
a Service for the API server to call, the one cluster permission kopf needs to write the
ValidatingWebhookConfiguration (with its caBundle), and a mounted certificate when one is named."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.conftest import Render, by_kind, one


def _env(docs: list[dict[str, Any]]) -> dict[str, str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_off_by_default(render: Render) -> None:
    docs = render()
    assert "KUBETUNE_WEBHOOK_PORT" not in _env(docs)
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("webhook")]


def test_enabled_renders_the_server_service_and_permission(render: Render) -> None:
    docs = render({"webhook": {"enabled": True, "failurePolicy": "Ignore"}})
    env = _env(docs)
    assert env["KUBETUNE_WEBHOOK_PORT"] == "9443" and env["KUBETUNE_WEBHOOK_FAILURE_POLICY"] == "Ignore"
    [service] = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("webhook")]
    assert env["KUBETUNE_WEBHOOK_HOST"].startswith(service["metadata"]["name"] + ".")
    assert service["spec"]["ports"][0]["targetPort"] == "webhook"
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    rules = [r for role in by_kind(docs, "ClusterRole") for r in role["rules"]]
    assert {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["validatingwebhookconfigurations"],
            "verbs": ["create", "patch"]} in rules


def test_a_named_certificate_is_mounted(render: Render) -> None:
    docs = render({"webhook": {"enabled": True, "certSecret": "kubetune-webhook-tls"}})
    env = _env(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "webhook-cert", "secret": {"secretName": "kubetune-webhook-tls"}} in pod["volumes"]
    assert env["KUBETUNE_WEBHOOK_CERT_FILE"] == "/etc/kubetune/webhook/tls.crt"


def test_failure_policy_is_checked_by_the_schema(render: Render) -> None:
    with pytest.raises(Exception, match="failurePolicy"):
        render({"webhook": {"enabled": True, "failurePolicy": "Sometimes"}})
