"""The operator, started with the very command line and environment the chart's Deployment gives it,
serves the probe path the chart checks and the Prometheus metrics the chart scrapes, while it runs
against the Kubernetes API emulator (``tests/support/emulating.py``).

The test renders the chart (with free ports), runs ``kubetune <args>`` from the rendered container
as a subprocess with the rendered plain-value env, applies a FineTuneJob, makes one API call fail
with a 500 (kmock fault injection), and reads the metrics back over HTTP: jobs by phase, reconcile
latency and errors, API errors.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kmock
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import PHASES
from tests.chart.conftest import ROOT, Render, by_kind
from tests.support.clusters import Cluster
from tests.support.emulating import EmulatorThread

T = TypeVar("T")
NAMESPACE = "default"
FTJ = ("kubetune.io/v1alpha1", "FineTuneJob")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


class OperatorProcess:
    """``kubetune`` run as a subprocess; its output is kept for failure messages."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune", *args], cwd=ROOT, env=env,
            stdout=log.open("w"), stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the operator exited ({self.proc.returncode}) while waiting for {what}:\n{self.output()}"
            value = probe()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": FTJ[0], "kind": FTJ[1], "metadata": {"name": name},
        "spec": {"model": {"source": "hf://sshleifer/tiny-gpt2"},
                 "data": {"datasets": [{"source": "data/tiny.jsonl", "format": "text"}]},
                 "training": {"maxSteps": 5}},
    }


@pytest.fixture()
def chart_container(render: Render) -> dict[str, Any]:
    """The rendered operator container, with free ports for health and metrics."""
    health, metrics = _free_port(), _free_port()
    docs = render({"operator": {"healthPort": health}, "metrics": {"port": metrics}})
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    container["_metrics_target"] = service["spec"]["ports"][0]["targetPort"]
    return container


@pytest.fixture()
def operator(chart_container: dict[str, Any], k8s_emulator: EmulatorThread, kubeconfig_file: Path,
             tmp_path: Path) -> Iterator[tuple[OperatorProcess, dict[str, Any]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env.update({e["name"]: e["value"] for e in chart_container["env"] if "value" in e})
    env.update({"KUBECONFIG": str(kubeconfig_file), "KUBETUNE_WATCH_SERVER_TIMEOUT": "30",
                "KUBETUNE_WATCH_CLIENT_TIMEOUT": "45", "KUBETUNE_RETRY_DELAY": "1"})
    assert chart_container["command"] == ["kubetune"]
    process = OperatorProcess(chart_container["args"], env, tmp_path / "operator.log")
    try:
        yield process, chart_container
    finally:
        process.stop()


def test_operator_serves_the_charts_probe_and_the_metrics_it_scrapes(
    operator: tuple[OperatorProcess, dict[str, Any]], k8s_emulator: EmulatorThread, kubeconfig_file: Path,
) -> None:
    process, container = operator
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    liveness, readiness = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    for probe in (liveness, readiness):
        url = f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"
        process.wait_for(lambda url=url: _get(url)[0] == 200, f"{url} to answer 200")
    metrics_url = f"http://127.0.0.1:{ports[container['_metrics_target']]}/metrics"
    status, text = _get(metrics_url)
    assert status == 200
    before = _samples(text)
    for phase in PHASES:
        assert before[("kubetune_finetunejobs", (("phase", phase),))] == 0

    # The first job's ConfigMap create fails with a 500: an API error and a failed reconcile (kopf
    # retries it later); the fault is one-shot, so the second job goes through.
    emulator = k8s_emulator.emulator
    assert emulator is not None
    emulator["post", kmock.resource("", "v1", "configmaps")][:1] << 500 << {"kind": "Status", "code": 500, "message": "injected"}
    api_error = ("kubetune_api_errors_total", (("resource", "configmaps"), ("status", "500"), ("verb", "create")))
    reconcile_errors = ("kubetune_reconcile_errors_total", (("kind", "FineTuneJob"),))
    reconciles = ("kubetune_reconcile_duration_seconds_count", (("kind", "FineTuneJob"),))
    cluster = Cluster(kubeconfig_file, namespace=NAMESPACE, emulator=k8s_emulator)
    try:
        cluster.create(_job("unlucky"))
        process.wait_for(lambda: _samples(_get(metrics_url)[1]).get(reconcile_errors), "the failed reconcile in the metrics")
        cluster.create(_job("lucky"))
        process.wait_for(lambda: cluster.find("batch/v1", "Job", "lucky"), "the trainer Job of the second FineTuneJob")

        def phases() -> dict[str, int]:
            out = dict.fromkeys((*PHASES, "Unknown"), 0)
            for name in ("unlucky", "lucky"):
                out[(cluster.get(*FTJ, name).get("status") or {}).get("phase") or "Unknown"] += 1
            return out

        def settled() -> dict[Any, float] | None:
            samples = _samples(_get(metrics_url)[1])
            lucky = (cluster.get(*FTJ, "lucky").get("status") or {}).get("phase")
            shown = samples.get(("kubetune_finetunejobs", (("phase", lucky),)), 0) if lucky else 0
            return samples if samples.get(reconciles, 0) >= 2 and shown >= 1 else None

        samples = process.wait_for(settled, "metrics to show the second job's phase and both reconciles")
        phases_now = phases()
    finally:
        cluster.close()

    assert samples[api_error] == 1
    assert samples[("kubetune_reconcile_duration_seconds_sum", (("kind", "FineTuneJob"),))] > 0
    assert samples[reconcile_errors] == 1
    assert "process_resident_memory_bytes" in {name for name, _ in samples}
    assert process.stop() in (0, -signal.SIGTERM), process.output()[-4000:]
    shown = {p: int(samples[("kubetune_finetunejobs", (("phase", p),))]) for p in (*PHASES, "Unknown")}
    assert shown == phases_now, (
        "kubetune_finetunejobs must count every FineTuneJob once, a job without status.phase yet (here "
        "'unlucky', whose first reconcile failed) under phase=\"Unknown\""
    )
