"""The operator scale bench on Kubernetes' API server code (``--crd-server DIR``, ``crdserver`` marker).

``bench/apishim`` serves the core, batch and RBAC kinds from stand-in CRDs on apiextensions-apiserver;
these tests check that clients see them as kube-apiserver shows them (paths, apiVersions, discovery,
error texts, Namespaces) and that the whole bench runs on it for kubetune's operator and the
reference. Run with ``pytest -m crdserver --crd-server DIR tests/bench`` after
``tests/support/build_crd_server.sh DIR``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from bench import operator_scale
from bench.crd_apiserver import ShimmedCrdServer
from tests.bench.test_operator_scale import bench_args

pytestmark = pytest.mark.crdserver


@pytest.fixture(scope="module")
def shim(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ShimmedCrdServer(pytestconfig.getoption("--crd-server"), tmp_path_factory.mktemp("shim")).start()
    try:
        yield f"http://127.0.0.1:{server.shim_port}"
    finally:
        server.stop()


def call(url: str, method: str = "GET", body: Any = None, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_discovery_shows_the_real_groups(shim: str) -> None:
    status, groups = call(f"{shim}/apis")
    names = {group["name"] for group in groups["groups"]}
    assert status == 200 and {"batch", "rbac.authorization.k8s.io", "kubetune.io"} <= names, names
    assert not any("shim" in name for name in names) and "" not in names, names
    _, core = call(f"{shim}/api/v1")
    assert core["groupVersion"] == "v1"
    resources = {resource["name"] for resource in core["resources"]}
    assert {"pods", "configmaps", "events", "namespaces", "pods/status"} <= resources, resources
    _, batch = call(f"{shim}/apis/batch/v1")
    assert batch["groupVersion"] == "batch/v1" and {"jobs", "jobs/status"} <= {r["name"] for r in batch["resources"]}


def test_objects_keep_their_real_api_versions(shim: str) -> None:
    status, ns = call(f"{shim}/api/v1/namespaces", "POST", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shimtest"}})
    assert status == 201 and ns["status"]["phase"] == "Active"
    assert call(f"{shim}/api/v1/namespaces", "POST", {"metadata": {"name": "shimtest"}})[0] == 409
    assert call(f"{shim}/api/v1/namespaces/shimtest")[0] == 200
    assert call(f"{shim}/api/v1/namespaces/nowhere")[0] == 404

    status, cm = call(f"{shim}/api/v1/namespaces/shimtest/configmaps", "POST",
                      {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "b"}}, "data": {"k": "v"}})
    assert status == 201 and cm["apiVersion"] == "v1" and cm["data"] == {"k": "v"}, cm
    status, again = call(f"{shim}/api/v1/namespaces/shimtest/configmaps", "POST",
                         {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    assert status == 409 and again["message"] == 'configmaps "c" already exists', again
    _, listed = call(f"{shim}/api/v1/namespaces/shimtest/configmaps?labelSelector=a%3Db")
    assert [item["apiVersion"] for item in listed["items"]] == ["v1"] and listed["kind"] == "ConfigMapList"

    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"template": {}}, "status": {"active": 1}}
    status, made = call(f"{shim}/apis/batch/v1/namespaces/shimtest/jobs", "POST", job)
    assert status == 201 and made["apiVersion"] == "batch/v1" and "status" not in made, made  # status only through /status
    status, patched = call(f"{shim}/apis/batch/v1/namespaces/shimtest/jobs/j/status", "PATCH", {"status": {"active": 1}},
                           "application/merge-patch+json")
    assert status == 200 and patched["status"] == {"active": 1}, patched


def test_the_bench_runs_both_operators_on_it(pytestconfig: pytest.Config) -> None:
    for reference in (False, True):
        result = asyncio.run(operator_scale.run_bench(bench_args(n=5, crd_server=pytestconfig.getoption("--crd-server"),
                                                                 reference=reference)))
        assert result["api_server"].startswith("apiextensions-apiserver"), result["api_server"]
        assert result["complete"] and result["lost"] == 0, result
        assert result["errors"]["operator_log"] == 0, result["errors"]
        assert result["api_server_cpu_seconds"] > 0
        per = result["api"]["per_lifecycle"]
        assert per.get("create jobs") == 1.0, per  # counted from the server's apiserver_request_total
        if not reference:
            assert result["api"]["writes_per_lifecycle"] == 11.0, per  # as on the emulator

