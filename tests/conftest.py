"""
Suite-wide pytest wiring: the Kubernetes fixtures every layer uses, and the ``--kubeconfig`` switch.

Fixtures (see ``tests/support`` for the classes):

* ``k8s_emulator`` — a fresh :class:`~tests.support.emulating.EmulatorThread` per test: ``.url``,
  ``.emulator`` (the kmock object, for fault injection and history), ``get_object`` /
  ``create_object`` / ``patch_object`` / ``delete_object`` / ``list_objects`` acting directly on
  its store;
* ``kubeconfig_file`` — a kubeconfig for that emulator, also exported as ``KUBECONFIG`` for the
  test (kopf, the ``kubernetes`` client and subprocesses pick it up);
* ``real_cluster`` — a :class:`~tests.support.clusters.Cluster` on the cluster named by
  ``--kubeconfig`` (skipped without it), in a fresh namespace deleted afterwards;
* ``cluster`` — the same :class:`Cluster` interface, parametrised: ``emulator`` always, ``real``
  (marked ``k8s``) only with ``--kubeconfig``. Write a test once against ``cluster``.

* ``crd_server`` — a real CRD API server (etcd + ``apiextensions-apiserver``, see
  ``tests/support/apiserver.py``) for the session, kubetune's CRD installed; ``crd_backend`` —
  a :class:`Cluster` serving finetunejobs, parametrised: ``emulator`` always, ``crdserver``
  (marked ``crdserver``) only with ``--crd-server DIR``; ``shim_server`` — the same server with
  ``bench/apishim`` in front, serving the core, batch and RBAC kinds from stand-in CRDs (see
  ``bench/crd_apiserver.py``), for the operator's flows on Kubernetes' API server code.

Tests marked ``k8s`` are skipped unless ``--kubeconfig PATH`` is given, and tests marked
``crdserver`` unless ``--crd-server DIR`` (or ``KUBETUNE_CRD_SERVER``) names the folder that
``tests/support/build_crd_server.sh`` built.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Iterator

import kubernetes
import pytest
import yaml

from tests.support.apiserver import CrdApiServer, find_binaries
from tests.support.clusters import Cluster, fresh_namespace_name, write_kubeconfig
from tests.support.emulating import EmulatorThread

# One CPU thread per torch process, set before any test module imports torch (tests/bench does, at
# collection): the tests train tiny models in this process, where a second intra-op thread gains
# nothing and its OpenMP spin-waiting burns the other core. Measured on the 2-core machine, the
# same tests with 2 threads took 3-4x the CPU seconds (and about twice the wall time under load).
# Subprocesses inherit it (the trainer tests' trainer_env sets it too); a value given is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Each test gets back the root logger's handlers and level it started with: code under test that
    configures logging in-process (``logging.basicConfig(stream=sys.stdout, force=True)``) binds a
    handler to the stream pytest captured for that test, which is closed once it ends, and a later
    test's log call would print '--- Logging error ---' into what it captures."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kubeconfig", action="store", default=None, metavar="PATH",
        help="run the tests marked k8s against the real cluster of this kubeconfig (skipped without it)",
    )
    parser.addoption(
        "--crd-server", action="store", default=os.environ.get("KUBETUNE_CRD_SERVER") or None, metavar="DIR",
        help="run the tests marked crdserver against etcd + apiextensions-apiserver from DIR "
             "(built by tests/support/build_crd_server.sh; default $KUBETUNE_CRD_SERVER; skipped without it)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs = {
        "k8s": (config.getoption("--kubeconfig"), "needs a real cluster: pass --kubeconfig PATH"),
        "crdserver": (config.getoption("--crd-server"), "needs the real CRD API server: pass --crd-server DIR"),
    }
    for marker, (given, reason) in needs.items():
        if given:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, path: pathlib.Path) -> None:
    """Point ``KUBECONFIG`` at ``path`` for this test, for this process and its subprocesses.

    The ``kubernetes`` client reads ``KUBECONFIG`` once, at import, into a module constant that
    ``load_kube_config()`` (and so ``kopf.login_via_client``) uses as its default: patch it too.
    """
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


@pytest.fixture()
def k8s_emulator() -> Iterator[EmulatorThread]:
    """A Kubernetes API server emulator on a free loopback port, fresh for each test."""
    thread = EmulatorThread().start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture()
def kubeconfig_file(k8s_emulator: EmulatorThread, tmp_path: pathlib.Path,
                    monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A kubeconfig pointing at ``k8s_emulator``, exported as ``KUBECONFIG`` for this test."""
    path = write_kubeconfig(tmp_path / "kubeconfig.yaml", k8s_emulator.kubeconfig())
    use_kubeconfig(monkeypatch, path)
    return path


@pytest.fixture(scope="session")
def real_kubeconfig(pytestconfig: pytest.Config) -> pathlib.Path:
    value = pytestconfig.getoption("--kubeconfig")
    if not value:
        pytest.skip("needs a real cluster: pass --kubeconfig PATH")
    path = pathlib.Path(value).expanduser().resolve()
    if not path.is_file():
        raise pytest.UsageError(f"--kubeconfig: no such file: {path}")
    return path


def namespaced_cluster(kubeconfig: pathlib.Path, emulator: EmulatorThread | None, *,
                        plays_controllers: bool | None = None) -> Iterator[Cluster]:
    namespace = fresh_namespace_name()
    cluster = Cluster(kubeconfig, namespace=namespace, emulator=emulator, plays_controllers=plays_controllers)
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        yield cluster
    finally:
        try:
            cluster.delete("v1", "Namespace", namespace, missing_ok=True)
        finally:
            cluster.close()


@pytest.fixture()
def real_cluster(real_kubeconfig: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """The ``--kubeconfig`` cluster, in a fresh namespace; ``KUBECONFIG`` points at it."""
    use_kubeconfig(monkeypatch, real_kubeconfig)
    yield from namespaced_cluster(real_kubeconfig, None)


@pytest.fixture(params=["emulator", pytest.param("real", marks=pytest.mark.k8s)])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """One test body, two backends: the emulator always, a real cluster with ``--kubeconfig``."""
    if request.param == "real":
        yield request.getfixturevalue("real_cluster")
        return
    emulator: EmulatorThread = request.getfixturevalue("k8s_emulator")
    kubeconfig: pathlib.Path = request.getfixturevalue("kubeconfig_file")
    assert os.environ["KUBECONFIG"] == str(kubeconfig)
    yield from namespaced_cluster(kubeconfig, emulator)


CRD_FILE = pathlib.Path(__file__).resolve().parents[1] / "crds" / "finetunejobs.kubetune.io.yaml"


@pytest.fixture(scope="session")
def crd_server(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrdApiServer]:
    """etcd + apiextensions-apiserver for the whole session, with ``crds/`` installed and Established."""
    value = pytestconfig.getoption("--crd-server")
    if not value:
        pytest.skip("needs the real CRD API server: pass --crd-server DIR")
    try:
        find_binaries(value)
    except FileNotFoundError as exc:
        raise pytest.UsageError(f"--crd-server: {exc}") from exc
    server = CrdApiServer(pathlib.Path(value), tmp_path_factory.mktemp("crd-server")).start()
    try:
        admin = Cluster(server.kubeconfig_path, namespace="default")
        try:
            crd = yaml.safe_load(CRD_FILE.read_text())
            admin.create(crd)
            name = crd["metadata"]["name"]

            def established() -> bool:
                found = admin.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
                return any(c["type"] == "Established" and c["status"] == "True" for c in (found.get("status") or {}).get("conditions") or [])

            admin.wait_for(established, timeout=30, what=f"CRD {name} Established")
            deadline = time.monotonic() + 30
            while True:  # discovery of the new group lags Established by a moment
                try:
                    admin.resolve("kubetune.io/v1alpha1", "FineTuneJob")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            admin.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["emulator", pytest.param("crdserver", marks=pytest.mark.crdserver)])
def crd_backend(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A :class:`Cluster` serving finetunejobs: the emulator, or the real CRD API server.

    The namespace is a fresh name; on the CRD server it is not created (no core API there, and
    without the NamespaceLifecycle admission plugin a namespaced custom resource needs none)."""
    if request.param == "emulator":
        emulator: EmulatorThread = request.getfixturevalue("k8s_emulator")
        kubeconfig: pathlib.Path = request.getfixturevalue("kubeconfig_file")
        yield from namespaced_cluster(kubeconfig, emulator)
        return
    server: CrdApiServer = request.getfixturevalue("crd_server")
    cluster = Cluster(server.kubeconfig_path, namespace=fresh_namespace_name())
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def shim_server(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """etcd + apiextensions-apiserver + ``bench/apishim`` for the session; yields the shim's kubeconfig
    (plain HTTP on loopback). Every kind the operator uses is served; Namespaces from the shim's memory;
    the shim also collects garbage (owner references), as kube-controller-manager would."""
    value = pytestconfig.getoption("--crd-server")
    if not value:
        pytest.skip("needs the real CRD API server: pass --crd-server DIR")
    from bench.crd_apiserver import ShimmedCrdServer

    server = ShimmedCrdServer(value, tmp_path_factory.mktemp("shim-server"), collect_garbage=True).start()
    try:
        yield server.kubeconfig_path
    finally:
        server.stop()

