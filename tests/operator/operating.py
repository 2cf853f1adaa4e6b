"""Running the real operator in tests, and playing the Kubernetes controllers the emulator lacks.

:func:`run_operator` starts kopf over ``operator/handlers.py`` with ``kopf.testing.KopfRunner`` and
a fresh ``kopf.OperatorRegistry`` (the handlers file is loaded into it anew each time, so two runs
in one test are two independent operators, as after a restart), watching one namespace.
:class:`JobController` writes the Job status the real Job controller would; on a real cluster it
does nothing and the real controller answers instead. Both the ``tests/operator`` and the
``tests/e2e`` conftests expose these as fixtures.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import kopf.testing
import pytest
import yaml

import kubetune.operator
from tests.conftest import namespaced_cluster, use_kubeconfig
from tests.support.clusters import Cluster
from tests.support.emulating import EmulatorThread

HANDLERS = str(pathlib.Path(kubetune.operator.__file__).with_name("handlers.py"))
REPO = pathlib.Path(__file__).resolve().parents[2]
FTJ = ("kubetune.io/v1alpha1", "FineTuneJob")
OPERATOR_ENV = {
    "KUBETUNE_TRAINER_IMAGE": "example.test/kubetune-trainer:test",
    "KUBETUNE_WATCH_SERVER_TIMEOUT": "30",
    "KUBETUNE_WATCH_CLIENT_TIMEOUT": "45",
    "KUBETUNE_HEALTH_PORT": "0",
}


@contextlib.contextmanager
def run_operator(namespace: str) -> Iterator[kopf.testing.KopfRunner]:
    args = ["run", "--standalone", "--namespace", namespace, HANDLERS]
    with kopf.testing.KopfRunner(args, registry=kopf.OperatorRegistry(), timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    assert "Traceback" not in runner.output, runner.output


def install_crd(cluster: Cluster) -> None:
    """The CRD from crds/ (already served by the emulator; applied on a real cluster)."""
    if not cluster.is_emulated:
        crd = yaml.safe_load((REPO / "crds" / "finetunejobs.kubetune.io.yaml").read_text())
        cluster.ensure(crd)


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    """A small valid FineTuneJob; ``spec`` blocks replace the defaults."""
    body: dict[str, Any] = {
        "model": {"source": "hf://sshleifer/tiny-gpt2"},
        "data": {"datasets": [{"source": "data/tiny.jsonl", "format": "text"}]},
        "training": {"maxSteps": 5},
    }
    body.update(spec)
    return {"apiVersion": FTJ[0], "kind": FTJ[1], "metadata": {"name": name}, "spec": body}


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.get(*FTJ, name).get("status") or {}


def condition(cluster: Cluster, name: str, kind: str) -> dict[str, Any] | None:
    return next((c for c in status(cluster, name).get("conditions") or [] if c["type"] == kind), None)


def wait_phase(cluster: Cluster, name: str, phase: str, timeout: float = 15.0) -> dict[str, Any]:
    return cluster.wait_for(lambda: (s := status(cluster, name)).get("phase") == phase and s,
                            timeout=timeout, what=f"{name} in phase {phase} (status: {status(cluster, name)})")


def events(cluster: Cluster, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events on the FineTuneJob ``name``, oldest first."""
    found = [e for e in cluster.list("v1", "Event") if e.get("involvedObject", {}).get("name") == name
             and e.get("involvedObject", {}).get("kind") == "FineTuneJob"]
    found.sort(key=lambda e: (e.get("lastTimestamp") or "", int(e["metadata"].get("resourceVersion") or 0)))
    return [(e.get("type", ""), e.get("reason", ""), e.get("message", "")) for e in found]


def wait_event(cluster: Cluster, name: str, reason: str, kind: str | None = None, timeout: float = 30) -> None:
    """Wait until the FineTuneJob ``name`` has an Event of ``reason`` (and type ``kind``): the operator
    posts it right after the status write that a test usually waits for, so reading once races it."""
    cluster.wait_for(lambda: any(r == reason and (kind is None or t == kind) for t, r, _ in events(cluster, name)),
                     timeout=timeout, what=f"a {kind or ''} {reason} Event on {name}".replace("  ", " "))


class JobController:
    """Plays the Job controller where there is none (the emulator, the CRD server through apishim);
    a no-op on a real cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @property
    def active(self) -> bool:
        return self.cluster.plays_controllers

    def set_status(self, job: str, status: dict[str, Any]) -> None:
        if self.active:
            self.cluster.patch("batch/v1", "Job", job, {"status": status}, subresource="status")

    def add_pod(self, job: str, index: int, pod_status: dict[str, Any]) -> None:
        """A trainer pod as the controller would make it (labels from the template, owned by the Job)."""
        if not self.active:
            return
        live = self.cluster.get("batch/v1", "Job", job)
        template = live["spec"]["template"]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{job}-{index}-abcde",
                "labels": {**template["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": str(index)},
                "annotations": {**template["metadata"]["annotations"], "batch.kubernetes.io/job-completion-index": str(index)},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job,
                                     "uid": live["metadata"]["uid"], "controller": True}],
            },
            "spec": template["spec"],
        }
        created = self.cluster.create(pod)
        self.cluster.patch("v1", "Pod", created["metadata"]["name"], {"status": pod_status}, subresource="status")

    def suspend(self, job: str) -> None:
        self.set_status(job, {"active": 0, "ready": 0, "conditions": [
            {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended"}]})

    def resume(self, job: str) -> None:
        self.set_status(job, {"active": 1, "ready": 1, "conditions": [
            {"type": "Suspended", "status": "False", "reason": "JobResumed", "message": "Job resumed"}]})


# ------------------------------------------------------------------------------------ fixtures
# Imported by tests/operator/conftest.py and tests/e2e/conftest.py.


@pytest.fixture()
def operator_process(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Any]:
    """``with operator_process(namespace):`` runs the operator; call it again to 'restart' it."""
    for key, value in OPERATOR_ENV.items():
        monkeypatch.setenv(key, value)
    return run_operator


@pytest.fixture(params=["emulator", pytest.param("real", marks=pytest.mark.k8s),
                        pytest.param("apishim", marks=pytest.mark.crdserver)])
def ftj_cluster(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A :class:`Cluster` with the FineTuneJob CRD installed, in a fresh namespace: the emulator; a real
    cluster with ``--kubeconfig``; with ``--crd-server DIR``, Kubernetes' API server code serving every
    kind through ``bench/apishim`` (no controllers there: :class:`JobController` plays them)."""
    if request.param == "real":
        cluster = request.getfixturevalue("real_cluster")
        install_crd(cluster)
        yield cluster
    elif request.param == "apishim":  # the CRD is installed with the server
        kubeconfig: pathlib.Path = request.getfixturevalue("shim_server")
        use_kubeconfig(monkeypatch, kubeconfig)
        yield from namespaced_cluster(kubeconfig, None, plays_controllers=True)
    else:  # the emulator serves the CRD
        yield from namespaced_cluster(request.getfixturevalue("kubeconfig_file"), request.getfixturevalue("k8s_emulator"))


@pytest.fixture()
def emulated_cluster(k8s_emulator: EmulatorThread, kubeconfig_file: pathlib.Path) -> Iterator[Cluster]:
    """A Cluster on the emulator only, in a fresh namespace: for flows that need to play controllers
    in detail (pods, OOM kills) or to inspect the requests the operator made."""
    yield from namespaced_cluster(kubeconfig_file, k8s_emulator)


@pytest.fixture()
def job_controller(request: pytest.FixtureRequest) -> JobController:
    """A JobController for whichever of ``emulated_cluster`` / ``ftj_cluster`` / ``cluster`` the test uses."""
    name = next(name for name in ("emulated_cluster", "ftj_cluster", "cluster") if name in request.fixturenames)
    return JobController(request.getfixturevalue(name))
