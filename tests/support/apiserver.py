"""
A real Kubernetes CRD API server for tests: etcd plus ``apiextensions-apiserver`` on loopback.

Why this and not kube-apiserver: no kube-apiserver, kine, k3s, kwok or envtest binary can be had
from the package registries this project's machines reach (PyPI, npm, Debian; see
``tests/support/build_crd_server.sh`` for what was looked at). Debian ships etcd and, as Go source
packages, ``k8s.io/apiextensions-apiserver`` with everything it imports, and Go itself; that
script builds the server from them. ``apiextensions-apiserver`` is the Kubernetes code that
serves CustomResourceDefinitions inside kube-apiserver (the same generic apiserver, storage,
OpenAPI schema validation, structural pruning, defaulting, CEL ``x-kubernetes-validations``,
status subresource and resourceVersion conflicts), run stand-alone. It serves no core API
(namespaces, pods, Jobs, RBAC), so the operator itself cannot run against it: the tests that use
it (marked ``crdserver``) check what the API server does with kubetune's CRD and objects.

Authentication is a client certificate from a CA made here; its subject is in ``system:masters``,
the group the delegated authorizer lets through without a core API server to ask. Anyone else
(anonymous, a ServiceAccount token) gets a 500: their SubjectAccessReview has nowhere to go. So
RBAC, impersonation and ServiceAccount tokens cannot be tested here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ETCD = "etcd"
APISERVER = "apiextensions-apiserver"
# Admission plugins that need objects of the core API (Namespaces, webhooks' Services, policies).
NO_CORE_ADMISSION = "NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
                 *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """A throw-away CA, a serving certificate for 127.0.0.1 and an admin client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-ca")])
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), server_key, ca_name, ca_key, server=True)
    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                            x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-admin")])
    admin = _certificate(admin_name, admin_key, ca_name, ca_key)
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "server.crt": server.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "admin.crt": admin.public_bytes(serialization.Encoding.PEM),
        "admin.key": _pem_key(admin_key),
    }
    paths = {}
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)
        paths[name] = path
    return paths


def find_binaries(folder: str | os.PathLike[str]) -> tuple[pathlib.Path, pathlib.Path]:
    """``(etcd, apiextensions-apiserver)`` in ``folder``; a clear error naming what is missing."""
    base = pathlib.Path(folder).expanduser().resolve()
    found = []
    for name in (ETCD, APISERVER):
        path = base / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"{path}: no executable {name} here (build it with tests/support/build_crd_server.sh {base})")
        found.append(path)
    return found[0], found[1]


@dataclass
class CrdApiServer:
    """etcd and apiextensions-apiserver as child processes; ``start()`` waits until CRDs can be served."""

    bin_dir: pathlib.Path
    work_dir: pathlib.Path
    port: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig_path(self) -> pathlib.Path:
        return self.work_dir / "kubeconfig.yaml"

    def kubeconfig(self) -> dict[str, Any]:
        pki = self.work_dir / "pki"
        return {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "crd-server", "cluster": {"server": self.url, "certificate-authority": str(pki / "ca.crt")}}],
            "users": [{"name": "admin", "user": {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")}}],
            "contexts": [{"name": "crd-server", "context": {"cluster": "crd-server", "user": "admin"}}],
            "current-context": "crd-server",
        }

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed by the child's exit
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def start(self, timeout: float = 90.0) -> "CrdApiServer":
        etcd, apiserver = find_binaries(self.bin_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        pki = write_pki(self.work_dir / "pki")
        client_port, peer_port = free_port(), free_port()
        self.port = self.port or free_port()
        self._spawn("etcd", [
            str(etcd), "--name", "kubetune-test", "--data-dir", str(self.work_dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client_port}", "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"kubetune-test=http://127.0.0.1:{peer_port}", "--log-level", "warn",
        ])
        self.kubeconfig_path.write_text(yaml.safe_dump(self.kubeconfig(), sort_keys=False))
        self._spawn("apiserver", [
            str(apiserver), "--etcd-servers", f"http://127.0.0.1:{client_port}",
            "--bind-address", "127.0.0.1", "--secure-port", str(self.port),
            "--tls-cert-file", str(pki["server.crt"]), "--tls-private-key-file", str(pki["server.key"]),
            "--client-ca-file", str(pki["ca.crt"]),
            # No core API server to delegate to: the kubeconfigs point at this server itself, so
            # only client certificates authenticate and only system:masters is authorized.
            "--authentication-skip-lookup", "--authentication-kubeconfig", str(self.kubeconfig_path),
            "--authorization-kubeconfig", str(self.kubeconfig_path), "--kubeconfig", str(self.kubeconfig_path),
            "--disable-admission-plugins", NO_CORE_ADMISSION, "--enable-priority-and-fairness=false",
            # e.g. "--v=1" to see the watch cache close watchers that fall behind
            *os.environ.get("KUBETUNE_CRD_SERVER_ARGS", "").split(),
        ])
        try:
            self._wait_ready(pki, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, pki: dict[str, pathlib.Path], timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        context.load_cert_chain(str(pki["admin.crt"]), str(pki["admin.key"]))
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: see {self.work_dir}")
            try:
                with urllib.request.urlopen(f"{self.url}/apis/apiextensions.k8s.io/v1", context=context, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError as error:
                last = error
            time.sleep(0.2)
        raise TimeoutError(f"apiextensions-apiserver not serving after {timeout:.0f} s ({last}); logs in {self.work_dir}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM both (apiserver first), then SIGKILL what outlives ``timeout``; remove etcd's data."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout)
        self.processes.clear()
        shutil.rmtree(self.work_dir / "etcd", ignore_errors=True)
