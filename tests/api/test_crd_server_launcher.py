"""The launcher of the real CRD server (``tests/support/apiserver.py``) starts, refuses strangers,
and stops without leaving a process or etcd's data behind."""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.apiserver import CrdApiServer, find_binaries


def test_missing_binaries_are_named_with_how_to_build_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no executable etcd here \(build it with tests/support/build_crd_server.sh"):
        find_binaries(tmp_path)
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    with pytest.raises(FileNotFoundError, match="no executable apiextensions-apiserver here"):
        find_binaries(tmp_path)


@pytest.mark.crdserver
def test_the_server_starts_refuses_strangers_and_stops_cleanly(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    server = CrdApiServer(Path(pytestconfig.getoption("--crd-server")), tmp_path / "server").start()
    try:
        pids = [process.pid for process in server.processes]
        assert len(pids) == 2
        config = yaml.safe_load(server.kubeconfig_path.read_text())
        assert config["clusters"][0]["cluster"]["server"] == server.url and server.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=config["clusters"][0]["cluster"]["certificate-authority"])
        with pytest.raises(urllib.error.HTTPError) as anonymous:  # TLS trusted, but no client certificate
            urllib.request.urlopen(f"{server.url}/apis/apiextensions.k8s.io/v1", context=trusting, timeout=10)
        # Only system:masters is authorized without a SubjectAccessReview; anyone else's review goes to
        # this server, which has no such API, so the request fails as an authorization error (500).
        assert anonymous.value.code == 500 and b"Internal" in anonymous.value.read()
    finally:
        server.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (tmp_path / "server" / "etcd").exists()
    assert server.processes == []
