"""The operator SIGKILLed — no cleanup, no last patch — then started again.

``kubetune operator`` runs as its own process (as in its Deployment) against the emulator, which
runs in the test. It is killed twice: in the middle of making a job's children (the emulator
stores the fourth child, the ConfigMap, and holds its answer back until the process is dead: a
write the dead operator never heard about), and while a job runs (its Job completes, and another
FineTuneJob is applied, while no operator is up). After each restart: every child exists exactly
once and every status reaches what the Job says.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import kmock
import pytest

from kubetune.api import ConditionType
from kubetune.operator import kubeapi, naming
from tests.operator.operating import OPERATOR_ENV, JobController, condition, manifest, wait_phase
from tests.operator.test_api_faults import assert_children_once
from tests.support.clusters import Cluster


class OperatorProcess:
    """``kubetune operator --namespace NS`` in a subprocess, logging to a file."""

    def __init__(self, kubeconfig: pathlib.Path, namespace: str, log: pathlib.Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, **OPERATOR_ENV, "KUBECONFIG": str(kubeconfig), "KUBETUNE_HEALTH_PORT": str(port),
               "KUBETUNE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator", "--namespace", namespace],
                                            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Hold:
    """Serves the first request that reaches it (the write lands) but holds the answer back until
    released; any later one goes on to the emulator's own handling."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator
        self.reached = threading.Event()
        self.released = threading.Event()
        self.held = 0

    async def __call__(self, request: kmock.Request) -> Any:
        if self.held:
            raise NotImplementedError  # kmock: go on to the emulator's own handling
        self.held += 1
        answer = self.emulator._serve_resource_request(request)
        self.reached.set()
        while not self.released.is_set():
            await asyncio.sleep(0.02)
        return answer


@pytest.fixture()
def operators(emulated_cluster: Cluster, kubeconfig_file: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[Any]:
    started: list[OperatorProcess] = []

    def start() -> OperatorProcess:
        started.append(OperatorProcess(kubeconfig_file, emulated_cluster.namespace, tmp_path / "operator.log"))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.mark.slow
def test_operator_sigkilled_mid_create_and_while_jobs_run_leaves_no_duplicates_and_converges(
        emulated_cluster: Cluster, operators: Any, job_controller: JobController, tmp_path: pathlib.Path) -> None:
    cluster = emulated_cluster
    emulator = cluster.emulator.emulator  # type: ignore[union-attr]
    hold = Hold(emulator)
    emulator[lambda r: r.headers.get("User-Agent", "").startswith(kubeapi.USER_AGENT)
             and str(r.method.value).upper() == "POST" and r.resource is not None
             and r.resource.plural == "configmaps"] << hold

    # 1. killed mid-create: the other children made (at once, beside the ConfigMap), the ConfigMap's
    # answer in flight, and so no Job yet (it is made only once every other child exists)
    first = operators()
    cluster.create(manifest("midway"))
    assert hold.reached.wait(90), (tmp_path / "operator.log").read_text()[-3000:]
    cluster.wait_for(lambda: cluster.find("rbac.authorization.k8s.io/v1", "RoleBinding", naming.names_for("midway").role_binding),
                     timeout=30, what="the RoleBinding made beside the held ConfigMap")
    time.sleep(0.5)  # were the Job made before the ConfigMap's answer, it would be there by now
    assert cluster.find("batch/v1", "Job", "midway") is None
    assert cluster.find("v1", "ConfigMap", naming.names_for("midway").config_map)  # landed; its answer is held
    first.kill()
    hold.released.set()
    second = operators()
    cluster.wait_for(lambda: condition(cluster, "midway", ConditionType.CREATED), timeout=90, what="midway created")
    assert_children_once(cluster, ["midway"], multi_node=[])

    # 2. killed while the job runs: it completes and another job is applied while no operator is up
    job_controller.add_pod("midway", 0, {"phase": "Running"})
    job_controller.set_status("midway", {"active": 1, "ready": 1})
    wait_phase(cluster, "midway", "Running", timeout=60)
    second.kill()
    job_controller.set_status("midway", {"active": 0, "ready": 0, "succeeded": 1,
                                         "conditions": [{"type": "Complete", "status": "True"}]})
    cluster.create(manifest("meanwhile"))
    time.sleep(1)
    operators()
    final = wait_phase(cluster, "midway", "Succeeded", timeout=90)
    cluster.wait_for(lambda: condition(cluster, "meanwhile", ConditionType.CREATED), timeout=90, what="meanwhile created")
    assert_children_once(cluster, ["midway", "meanwhile"], multi_node=[])
    assert {c["type"]: c["status"] for c in final["conditions"]}[ConditionType.SUCCEEDED] == "True"
    log = (tmp_path / "operator.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
