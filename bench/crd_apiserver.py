"""Kubernetes' own API server code for ``bench/operator_scale.py --crd-server DIR``.

No kube-apiserver binary can be had on the machines this project is built on
(``tests/support/build_crd_server.sh`` says what was looked at), but Debian ships the source of
``apiextensions-apiserver`` — the half of kube-apiserver that serves CustomResourceDefinitions:
the same generic API server, etcd storage, watch cache, label selectors, resourceVersion
conflicts and status subresource — and that script builds it with etcd. It serves no core API,
so the kinds the operator writes (Pods, Jobs, ConfigMaps, Services, ServiceAccounts, Roles,
RoleBindings, Events, PVCs) are installed there as custom resources of stand-in groups
(``bench/apishim/standins.yaml``), and ``bench/apishim`` (Go, built by the same script) serves
them to the operator and the bench under their real paths and apiVersions, rewriting both ways.

What this measures that the emulator does not: a server in Go with etcd behind it, sharing the
machine's cores as the issue asks. What differs from kube-apiserver: the core and batch kinds
are stored as JSON custom resources with an open schema (kube-apiserver stores them as protobuf
and validates them in Go), no admission chain, no RBAC (the shim authenticates as
``system:masters``), no Namespace objects (the shim answers their create), and one more hop (the
shim, its CPU counted with the server's).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIM = "apishim"
STANDINS = REPO / "bench" / "apishim" / "standins.yaml"


def _cpu_seconds(pid: int) -> float:
    """``process_cpu_seconds``, 0.0 once the process is gone."""
    from bench.operator_scale import process_cpu_seconds

    try:
        return process_cpu_seconds(pid)
    except OSError:
        return 0.0


class ShimmedCrdServer:
    """etcd + apiextensions-apiserver + the shim; ``kubeconfig_path`` points clients at the shim."""

    def __init__(self, bin_dir: str | os.PathLike[str], work_dir: pathlib.Path, *, collect_garbage: bool = False) -> None:
        """``collect_garbage``: the shim deletes the dependents of deleted objects, as Kubernetes'
        garbage collector does (tests of deletion flows; the scale bench runs without it)."""
        sys.path.insert(0, str(REPO))
        from tests.support.apiserver import CrdApiServer, free_port

        self.bin_dir = pathlib.Path(bin_dir).expanduser().resolve()
        shim = self.bin_dir / SHIM
        if not (shim.is_file() and os.access(shim, os.X_OK)):
            raise FileNotFoundError(f"{shim}: no executable {SHIM} here (build it with tests/support/build_crd_server.sh {self.bin_dir})")
        self.work_dir = work_dir
        self.server = CrdApiServer(self.bin_dir, work_dir / "crd-server")
        self.shim_port = free_port()
        self.shim: subprocess.Popen[bytes] | None = None
        self.kubeconfig_path = work_dir / "kubeconfig-shim.yaml"
        self.collect_garbage = collect_garbage

    # ---------------------------------------------------------------- start / stop

    def start(self, timeout: float = 120.0) -> ShimmedCrdServer:
        self.server.start(timeout)
        try:
            pki = self.server.work_dir / "pki"
            self._context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            self._context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
            from kubetune.api.crds import build_crd

            crds = [doc for doc in yaml.safe_load_all(STANDINS.read_text()) if doc] + [build_crd()]
            for crd in crds:
                self._post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            for crd in crds:
                self._wait_established(crd["metadata"]["name"], timeout)
            log = open(self.work_dir / "apishim.log", "wb")  # noqa: SIM115 - closed by the child's exit
            self.shim = subprocess.Popen(
                [str(self.bin_dir / SHIM), "-listen", f"127.0.0.1:{self.shim_port}", "-upstream", self.server.url,
                 "-ca", str(pki / "ca.crt"), "-cert", str(pki / "admin.crt"), "-key", str(pki / "admin.key"),
                 *(["-gc"] if self.collect_garbage else []),
                 *(["-v"] if os.environ.get("KUBETUNE_APISHIM_VERBOSE") else [])],  # every request in apishim.log
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            self.kubeconfig_path.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "shim", "cluster": {"server": f"http://127.0.0.1:{self.shim_port}"}}],
                "users": [{"name": "shim", "user": {}}],
                "contexts": [{"name": "shim", "context": {"cluster": "shim", "user": "shim"}}],
                "current-context": "shim",
            }, sort_keys=False))
            self._wait_shim(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.shim is not None and self.shim.poll() is None:
            os.killpg(self.shim.pid, signal.SIGTERM)
            self.shim.wait(15)
        self.server.stop()

    # ---------------------------------------------------------------- what the bench reads

    def cpu_seconds(self) -> float:
        """CPU seconds so far of etcd, the API server and the shim together."""
        pids = [process.pid for process in self.server.processes] + ([self.shim.pid] if self.shim else [])
        return round(sum(_cpu_seconds(pid) for pid in pids), 2)

    def describe(self) -> str:
        """``apiextensions-apiserver 0.36.4 + etcd 3.5.30 via apishim``, from the Debian packages in VERSIONS."""
        found: dict[str, str] = {}
        listing = self.bin_dir / "VERSIONS"
        for deb in listing.read_text().split() if listing.exists() else []:  # name_version_arch.deb
            name, version = deb.split("_")[:2]
            found[name] = version.split("-")[0]
        server = found.get("golang-k8s-apiextensions-apiserver-dev", "?")
        return f"apiextensions-apiserver {server} + etcd {found.get('etcd-server', '?')} via apishim"

    # ---------------------------------------------------------------- helpers

    def _post(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(self.server.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, context=self._context, timeout=30).close()
        except urllib.error.HTTPError as error:
            if error.code != 409:
                raise RuntimeError(f"POST {path}: {error.code} {error.read()[:300]!r}") from None

    def _wait_established(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.server.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url, context=self._context, timeout=30) as response:
                conditions = (json.load(response).get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                return
            time.sleep(0.2)
        raise TimeoutError(f"CRD {name} not Established after {timeout:.0f} s")

    @staticmethod
    def _list_paths() -> list[str]:
        from kubetune.operator import kubeapi

        return [kubeapi._path(kind, "default")[0] for kind in kubeapi.RESOURCES]  # noqa: SLF001

    def _wait_shim(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.shim is not None
            if self.shim.poll() is not None:
                raise RuntimeError(f"{SHIM} exited with {self.shim.returncode}: see {self.work_dir / 'apishim.log'}")
            try:  # discovery, and every kind listed (the watch caches are ready: 429 until then)
                for path in ["/apis", "/api/v1", *self._list_paths()]:
                    urllib.request.urlopen(f"http://127.0.0.1:{self.shim_port}{path}", timeout=5).close()
                return
            except OSError as error:
                last = error
            time.sleep(0.2)
        raise TimeoutError(f"{SHIM} not serving after {timeout:.0f} s ({last})")
