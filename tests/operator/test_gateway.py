"""The API gateway's contract for its callers, its credentials, and what it keeps out of the operator.

``kubeapi`` speaks to the emulator over loopback HTTP with one aiohttp session: create folds 409
into (the existing object, False), get answers None for 404, list selects by label, patch merges
(the object or its status), events are posted. Credentials come from kopf's own parsers (the
kubeconfig's token here), a 401 makes it read them again once (a rotated token), a kubeconfig
whose user needs an exec plugin goes through the official client's loader (and says so), and a
TLS server is trusted through the kubeconfig's CA only. Running ``kubetune operator`` itself with
a token kubeconfig, or with a pod's service account, never imports the ``kubernetes`` package.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import pathlib
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator

import aiohttp.web
import kmock
import kopf
import pytest
import yaml

from kubetune.operator import certificates, kubeapi
from tests.conftest import use_kubeconfig
from tests.operator.operating import OPERATOR_ENV, REPO, manifest
from tests.support.clusters import Cluster
from tests.support.emulating import EmulatorThread

CONFIGMAPS = kmock.resource("", "v1", "configmaps")
JOBS = kmock.resource("batch", "v1", "jobs")


@pytest.fixture()
def gateway(k8s_emulator: EmulatorThread, kubeconfig_file: pathlib.Path) -> Iterator[EmulatorThread]:
    kubeapi.connect()
    try:
        yield k8s_emulator
    finally:
        kubeapi.close()


def _configmap(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "data": {"a": "1"}}


def _authorizations(emulator: EmulatorThread) -> list[str]:
    assert emulator.emulator is not None
    return [r.headers.get("Authorization", "") for r in list(emulator.emulator)
            if r.headers.get("User-Agent", "").startswith(kubeapi.USER_AGENT)]


def _job(name: str, **labels: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"suspend": False}}


async def test_the_verbs_keep_their_contract(gateway: EmulatorThread) -> None:
    made, created = await kubeapi.create(_job("one", team="a"))
    assert created and made["metadata"]["uid"] and made["spec"] == {"suspend": False}
    again, created = await kubeapi.create(_job("one", team="a"))  # 409 folded: the live object
    assert not created and again["metadata"]["uid"] == made["metadata"]["uid"]
    await kubeapi.create(_job("two", team="b"))
    assert await kubeapi.get("Job", "default", "absent") is None
    assert [o["metadata"]["name"] for o in await kubeapi.list_objects("Job", "default", label_selector="team=b")] == ["two"]
    patched = await kubeapi.patch("Job", "default", "one", {"spec": {"parallelism": 2}})
    assert patched is not None and patched["spec"] == {"suspend": False, "parallelism": 2}  # a merge patch
    assert await kubeapi.patch("Job", "default", "absent", {"spec": {"suspend": True}}) is None
    with pytest.raises(kubeapi.UndeclaredPermission):  # the chart's RBAC would refuse it: never sent
        await kubeapi.patch("ConfigMap", "default", "one", {"data": {}})
    gateway.create_object(f"{kubeapi.RESOURCES['FineTuneJob'][0]}/{kubeapi.RESOURCES['FineTuneJob'][1]}/finetunejobs",
                          "default", {"metadata": {"name": "ftj"}, "spec": {}})
    status = await kubeapi.patch("FineTuneJob", "default", "ftj", {"status": {"phase": "Running"}}, subresource="status")
    assert status is not None and status["status"]["phase"] == "Running"
    assert await kubeapi.patch("FineTuneJob", "default", "absent", {"status": {"phase": "Running"}}, subresource="status") is None
    await kubeapi.post_event(made, reason="Tested", message="the gateway posts events")
    events = gateway.list_objects("v1/events", "default")
    assert [(e["reason"], e["involvedObject"]["name"]) for e in events] == [("Tested", "one")]
    assert set(_authorizations(gateway)) == {"Bearer emulator-token"}  # the kubeconfig's token, read by kopf's parser


async def test_requests_share_one_session_and_a_bounded_pool(gateway: EmulatorThread) -> None:
    await asyncio.gather(*(kubeapi.create(_configmap(f"cm-{i}")) for i in range(3 * kubeapi.MAX_IN_FLIGHT)))
    assert len(gateway.list_objects("v1/configmaps", "default")) == 3 * kubeapi.MAX_IN_FLIGHT
    sessions = list(kubeapi._sessions.values())  # noqa: SLF001
    assert len(sessions) == 1 and sessions[0][1].connector is not None
    assert sessions[0][1].connector.limit == kubeapi.MAX_IN_FLIGHT
    await kubeapi.aclose()
    assert sessions[0][1].closed and not kubeapi.is_connected()


async def test_a_401_reads_the_credentials_again_once(gateway: EmulatorThread, kubeconfig_file: pathlib.Path) -> None:
    emulator = gateway.emulator
    assert emulator is not None
    gateway.create_object("v1/configmaps", "default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    config = yaml.safe_load(kubeconfig_file.read_text())
    config["users"][0]["user"]["token"] = "rotated-token"  # the projected token was rotated on disk
    kubeconfig_file.write_text(yaml.safe_dump(config))
    emulator["get", CONFIGMAPS][:1] << 401 << {"kind": "Status", "code": 401, "message": "Unauthorized"}
    found = await kubeapi.get("ConfigMap", "default", "cm")
    assert found is not None and found["data"] == {"a": "1"}
    assert _authorizations(gateway)[-2:] == ["Bearer emulator-token", "Bearer rotated-token"]
    # refused again after the re-read: the 401 goes to the caller (no loop of logins)
    emulator["get", JOBS][:2] << 401 << {"kind": "Status", "code": 401, "message": "Unauthorized"}
    with pytest.raises(kubeapi.ApiError) as raised:
        await kubeapi.get("Job", "default", "job")
    assert raised.value.status == 401
    assert _authorizations(gateway)[-2:] == ["Bearer rotated-token", "Bearer rotated-token"]


EXEC_PLUGIN = """import json
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": "exec-token"}}))
"""


async def test_an_exec_plugin_kubeconfig_logs_in_through_the_kubernetes_client(
        k8s_emulator: EmulatorThread, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EXEC_PLUGIN)
    config = k8s_emulator.kubeconfig()
    config["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                           "command": sys.executable, "args": [str(plugin)], "interactiveMode": "Never"}}
    path = tmp_path / "exec-kubeconfig.yaml"
    path.write_text(yaml.safe_dump(config))
    use_kubeconfig(monkeypatch, path)
    k8s_emulator.create_object("v1/configmaps", "default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    caplog.set_level(logging.INFO, logger=kubeapi.__name__)
    try:
        kubeapi.connect()
        assert await kubeapi.get("ConfigMap", "default", "cm") is not None
    finally:
        kubeapi.close()
    assert _authorizations(k8s_emulator) == ["Bearer exec-token"]
    assert any("logging in through the kubernetes client library" in r.getMessage() for r in caplog.records)


@pytest.fixture()
def tls_server(tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    """An HTTPS server for "localhost" with a self-signed certificate: (its URL, the certificate)."""
    cert, key = certificates.self_signed(None, tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def configmap(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"kind": "ConfigMap", "metadata": {"name": request.match_info["name"]},
                                          "seen": request.headers.get("Authorization")})

    app = aiohttp.web.Application()
    app.router.add_get("/api/v1/namespaces/default/configmaps/{name}", configmap)
    loop = asyncio.new_event_loop()
    runner = aiohttp.web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{port}", cert
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.mark.parametrize("trusted", [True, False])
async def test_tls_trusts_the_kubeconfigs_ca_only(tls_server: tuple[str, pathlib.Path], tmp_path: pathlib.Path,
                                                 monkeypatch: pytest.MonkeyPatch, trusted: bool) -> None:
    url, cert = tls_server
    (tmp_path / "other").mkdir()
    ca = cert.read_bytes() if trusted else certificates.self_signed(None, tmp_path / "other")[0].read_bytes()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "c", "cluster": {"server": url, "certificate-authority-data": base64.b64encode(ca).decode()}}],
              "users": [{"name": "u", "user": {"token": "tls-token"}}],
              "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}
    path = tmp_path / "tls-kubeconfig.yaml"
    path.write_text(yaml.safe_dump(config))
    use_kubeconfig(monkeypatch, path)
    try:
        kubeapi.connect()
        if trusted:
            found = await kubeapi.get("ConfigMap", "default", "cm")
            assert found is not None and found["seen"] == "Bearer tls-token"
        else:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await kubeapi.get("ConfigMap", "default", "cm")
    finally:
        kubeapi.close()


# ------------------------------------------------------------------------------------ the operator process

PROBE = """import atexit, json, os, sys
def report():
    print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'urllib3', 'torch'))))
atexit.register(report)
if sys.argv[1] == "service-account":
    # A pod: kopf's service-account reader finds the mounted token (here: the emulator's credentials,
    # as the files under /var/run/secrets/kubernetes.io/serviceaccount would give them) and no KUBECONFIG.
    from kubetune.operator.loading import without_client_libraries
    with without_client_libraries():  # as kubetune operator loads kopf (below)
        import kopf
    from_file = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    kopf.login_with_service_account = lambda **_: from_file
    del os.environ["KUBECONFIG"]
    os.environ["HOME"] = sys.argv[3]  # no ~/.kube/config either
from kubetune.cli import main
sys.exit(main(["operator", "--namespace", sys.argv[2]]))
"""


@pytest.mark.parametrize("credentials", ["kubeconfig", "service-account"])
def test_the_operator_process_never_imports_the_kubernetes_client(
        emulated_cluster: Cluster, tmp_path: pathlib.Path, credentials: str) -> None:
    cluster = emulated_cluster
    env = {**os.environ, **OPERATOR_ENV, "KUBETUNE_LOG_LEVEL": "INFO"}
    process = subprocess.Popen([sys.executable, "-c", PROBE, credentials, cluster.namespace, str(tmp_path)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.create(manifest("quiet"))
        cluster.wait_for(lambda: [j for j in cluster.list("batch/v1", "Job") if j["metadata"]["name"] == "quiet"],
                         timeout=60, what="the operator made the Job")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    line = next((x for x in output.splitlines() if x.startswith("MODULES ")), None)
    assert line is not None, output
    assert json.loads(line.removeprefix("MODULES ")) == [], output
    assert "kubernetes client library" not in output and "Traceback" not in output, output


@pytest.mark.parametrize(("host", "port", "server"), [
    ("10.96.0.1", "443", "https://10.96.0.1:443"),
    ("fd00::1", "6443", "https://[fd00::1]:6443"),
    (None, None, "https://kubernetes.default.svc"),
])
def test_in_a_pod_the_api_server_is_reached_at_the_service_address_the_kubelet_sets(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, host: str | None, port: str | None, server: str) -> None:
    """As client-go does: KUBERNETES_SERVICE_HOST/PORT, no DNS lookup of kubernetes.default.svc (a pod whose
    DNS is slow or blocked still reaches the API); kopf's name only where the kubelet set no address."""
    for key, value in (("KUBERNETES_SERVICE_HOST", host), ("KUBERNETES_SERVICE_PORT", port)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    from_file = kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="t0ken", ca_path=str(tmp_path / "ca.crt"))
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: from_file)
    info = kubeapi.read_credentials()
    assert info.server == server
    assert info.token == "t0ken" and info.ca_path == from_file.ca_path
