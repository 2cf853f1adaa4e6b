"""``kubetune operator`` as a process: it serves FineTuneJobs and answers its health endpoint."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.operator.operating import FTJ, manifest
from tests.support.clusters import Cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_operator_command_serves_jobs_and_health(emulated_cluster: Cluster, kubeconfig_file: pathlib.Path) -> None:
    cluster = emulated_cluster
    port = _free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig_file), "KUBETUNE_TRAINER_IMAGE": "example.test/t:1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "operator", "--namespace", cluster.namespace,
         "--health-port", str(port), "--log-level", "WARNING"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.create(manifest("from-cli"))
        job = cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "from-cli"), timeout=30, what="the Job")
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "example.test/t:1"
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    assert answer.status == 200 and b"connected" in answer.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "no /healthz"
                time.sleep(0.2)
        assert cluster.get(*FTJ, "from-cli")["status"]["conditions"]
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Traceback" not in output, output

