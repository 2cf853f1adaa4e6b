"""The chart renders, for the default values and a matrix of non-default ones, into objects a
Kubernetes API server accepts (``kubernetes-validate``, strict, the newest bundled schemas), and
the objects do what the values say."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest

import kubetune
from tests.chart.conftest import NAMESPACE, RELEASE, HelmError, Render, by_kind, one

KUBERNETES = kubernetes_validate.latest_version()

#: Non-default values, each turning on what the defaults leave off (names are the test ids).
MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "no-crds": {"crds": {"enabled": False}},
    "crds-not-kept": {"crds": {"keep": False}},
    "everything-on": {
        "metrics": {
            "port": 9100,
            "service": {"port": 8443, "annotations": {"prometheus.io/scrape": "true"}},
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}, "interval": "15s",
                               "relabelings": [{"targetLabel": "team", "replacement": "ml"}]},
        },
        "networkPolicy": {
            "enabled": True,
            "apiServerCIDRs": ["10.0.0.1/32"],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
        "tensorboard": {"enabled": True, "claimName": "reviews-workspace", "logDir": "/output/tensorboard", "namespace": "team-a"},
        "trainer": {"imagePullSecrets": ["regcred", "other"]},
        "operator": {
            "imagePullSecrets": ["regcred"],
            "logLevel": "DEBUG",
            "healthPort": 8181,
            "extraArgs": ["--verbose"],
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
            "priorityClassName": "system-cluster-critical",
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "ml"},
        },
        "commonLabels": {"cost-center": "ml"},
        "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "kt@p.iam.gserviceaccount.com"}},
    },
    "metrics-off": {"metrics": {"enabled": False}, "networkPolicy": {"enabled": True}},
    "existing-service-account-no-rbac": {"serviceAccount": {"create": False, "name": "ops"}, "rbac": {"create": False}},
    "pinned-digests": {
        "operator": {"image": {"repository": "registry.local/kt-operator", "digest": "sha256:" + "a" * 64}},
        "trainer": {"image": {"repository": "registry.local/kt-trainer", "tag": "0.1.0-cu124"}},
    },
    "long-release-name": {"fullnameOverride": "a-very-long-release-name-that-goes-on-and-on-for-sixty-three-c"},
}


def _validate(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as exc:  # its str() dumps the whole schema
        where = ".".join(str(p) for p in exc.absolute_path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}") from None


def _check_service_monitor(monitor: dict[str, Any], services: list[dict[str, Any]]) -> None:
    """ServiceMonitor is a Prometheus Operator CRD, not in the bundled schemas: check it selects the
    metrics Service and names one of its ports."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 1, "the ServiceMonitor must select exactly the metrics Service"
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [selected[0]["metadata"]["namespace"]]


@pytest.mark.parametrize("values", MATRIX.values(), ids=MATRIX.keys())
def test_every_rendered_object_is_valid_kubernetes(render: Render, values: dict[str, Any]) -> None:
    docs = render(values)
    assert docs
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            _check_service_monitor(doc, by_kind(docs, "Service"))
        else:
            _validate(doc)
        name = doc["metadata"]["name"]
        assert len(name) <= 63 or doc["kind"] == "CustomResourceDefinition", name
        if doc["kind"] not in {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"].get("namespace"), f"{doc['kind']}/{name} has no namespace"


@pytest.mark.parametrize("values", MATRIX.values(), ids=MATRIX.keys())
def test_operator_runs_alone_non_root_with_probes(render: Render, values: dict[str, Any]) -> None:
    (deployment,) = [d for d in by_kind(render(values), "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # docs/operations.md, Security: uid 65532 and the RuntimeDefault seccomp profile
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["seccompProfile"]) == (65532, {"type": "RuntimeDefault"})
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health_port = values.get("operator", {}).get("healthPort", 8080)
    assert ports["health"] == health_port
    assert f"--health-port={health_port}" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["command"] == ["kubetune"] and container["args"][0] == "operator"


def _operator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_watched_namespaces_become_flags(render: Render) -> None:
    assert "--all-namespaces" in _operator(render())["args"]
    args = _operator(render(MATRIX["watch-namespaces"]))["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]


def test_images_default_to_the_package_version(render: Render) -> None:
    container = _operator(render())
    assert container["image"] == f"ghcr.io/kubetune/operator:{kubetune.__version__}"
    assert f"--trainer-image=ghcr.io/kubetune/trainer:{kubetune.__version__}" in container["args"]


def test_pinned_images_and_trainer_pull_secrets_reach_the_operator(render: Render) -> None:
    container = _operator(render(MATRIX["pinned-digests"]))
    assert container["image"] == "registry.local/kt-operator@sha256:" + "a" * 64
    assert "--trainer-image=registry.local/kt-trainer:0.1.0-cu124" in container["args"]
    everything = render(MATRIX["everything-on"])
    env = {e["name"]: e.get("value") for e in _operator(everything)["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE_PULL_SECRETS"] == "regcred,other"
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    pod = next(d for d in by_kind(everything, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-kubetune")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_metrics_service_reaches_the_metrics_port(render: Render) -> None:
    docs = render(MATRIX["everything-on"])
    container = _operator(docs)
    assert "--metrics-port=9100" in container["args"]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8443, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-kubetune")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "ServiceMonitor")["metadata"]["labels"]["release"] == "prom"


def test_metrics_off_leaves_no_service_flag_or_policy_port(render: Render) -> None:
    docs = render(MATRIX["metrics-off"])
    assert not any(a.startswith("--metrics-port") for a in _operator(docs)["args"])
    assert not by_kind(docs, "Service") and not by_kind(docs, "ServiceMonitor")
    policy = one(docs, "NetworkPolicy")
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == ["health"]


def test_network_policy_opens_only_metrics_health_dns_and_the_api_server(render: Render) -> None:
    policy = one(render(MATRIX["everything-on"]), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    metrics_rule, health_rule = policy["ingress"]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert "from" not in health_rule
    dns, api = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert [p["port"] for p in api["ports"]] == [443, 6443]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert not by_kind(render(), "NetworkPolicy")


def test_network_policy_lets_the_api_server_reach_the_webhook(render: Render) -> None:
    """With the admission webhook on, the API server calls the operator pod: a NetworkPolicy that let
    only metrics and health in would time every FineTuneJob apply out (failurePolicy Fail)."""
    rendered = one(render({"networkPolicy": {"enabled": True}, "webhook": {"enabled": True}}), "NetworkPolicy")
    _validate(rendered)
    policy = rendered["spec"]
    ports = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
    assert "webhook" in ports
    (rule,) = [r for r in policy["ingress"] if [p["port"] for p in r["ports"]] == ["webhook"]]
    assert "from" not in rule  # the API server's source address is the control plane's, not known here
    off = one(render({"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"]
    assert "webhook" not in [p["port"] for rule in off["ingress"] for p in rule["ports"]]


def test_tensorboard_reads_the_shared_claim_read_only(render: Render) -> None:
    docs = render(MATRIX["everything-on"])
    (board,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-tensorboard")]
    pod = board["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["tensorboard"]
    assert "--logdir=/runs/output/tensorboard" in container["args"]
    assert board["metadata"]["namespace"] == "team-a"
    assert container["image"] == f"ghcr.io/kubetune/trainer:{kubetune.__version__}"
    claim = next(v for v in pod["volumes"] if v["name"] == "runs")["persistentVolumeClaim"]
    assert claim == {"claimName": "reviews-workspace", "readOnly": True}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-tensorboard"))
    assert service["metadata"]["namespace"] == "team-a"
    assert service["spec"]["selector"].items() <= board["spec"]["template"]["metadata"]["labels"].items()


def test_existing_service_account_is_used_and_nothing_is_created(render: Render) -> None:
    docs = render(MATRIX["existing-service-account-no-rbac"])
    assert not by_kind(docs, "ServiceAccount")
    assert not any(d["kind"] in {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} for d in docs)
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_common_labels_reach_every_object(render: Render) -> None:
    for doc in render(MATRIX["everything-on"]):
        if doc["kind"] != "CustomResourceDefinition":
            assert doc["metadata"]["labels"]["cost-center"] == "ml", doc["kind"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"logLevel": "LOUD"}}, "/operator/logLevel"),
        ({"operator": {"replicas": 2}}, "additional properties 'replicas' not allowed"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"metrics": {"port": 70000}}, "/metrics/port"),
        ({"operator": {"image": {"digest": "latest"}}}, "/operator/image/digest"),
        ({"tensorboard": {"enabled": True}}, "tensorboard.claimName"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
        ({"metrics": {"port": 8080}}, "metrics.port and operator.healthPort"),
    ],
    ids=["log-level", "unknown-key", "namespace-name", "port-range", "digest", "tensorboard-claim", "sa-name", "port-clash"],
)
def test_bad_values_are_refused_naming_the_value(render: Render, values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmError, match=re.escape(message)):
        render(values)


def test_release_namespace_is_used(render: Render) -> None:
    docs = render(namespace="ml-ops")
    assert {d["metadata"].get("namespace") for d in docs} - {None} == {"ml-ops"}
    assert NAMESPACE != "ml-ops"


def test_every_kubetune_variable_the_chart_sets_is_an_operator_setting(render: Render) -> None:
    """A variable the operator does not read would be a value that silently does nothing
    (trainer.imagePullSecrets reaches the operator as KUBETUNE_TRAINER_IMAGE_PULL_SECRETS)."""
    from kubetune.operator.settings import Settings

    known = set(Settings.documentation())
    names = {e["name"] for e in _operator(render(MATRIX["everything-on"]))["env"]} - {"HTTPS_PROXY"}
    unread = sorted(n for n in names if n.startswith("KUBETUNE_") and n not in known)
    assert unread == [], f"the chart sets {unread}, which kubetune.operator.settings.Settings does not read"


def test_the_object_names_the_docs_commands_use(helm, tmp_path) -> None:
    """`helm install kubetune …` (README, docs/install.md) makes the names the docs then use:
    deployment/kubetune, svc/kubetune-metrics, svc/kubetune-tensorboard (in tensorboard.namespace)."""
    import yaml

    from tests.chart.conftest import CHART, run_helm

    values = {"tensorboard": {"enabled": True, "namespace": "team-a", "claimName": "quickstart-workspace"}}
    docs = [d for d in yaml.safe_load_all(run_helm(helm, "template", "kubetune", str(CHART), "--namespace", NAMESPACE,
                                                   values=values, tmp=tmp_path)) if d]
    names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
    assert {("Deployment", NAMESPACE, "kubetune"), ("Service", NAMESPACE, "kubetune-metrics"),
            ("Service", "team-a", "kubetune-tensorboard")} <= names, sorted(names)
    # another release name gets the chart's name appended: <release>-kubetune-metrics
    other = [d for d in yaml.safe_load_all(run_helm(helm, "template", "ml", str(CHART), "--namespace", NAMESPACE)) if d]
    assert "ml-kubetune-metrics" in {d["metadata"]["name"] for d in by_kind(other, "Service")}
