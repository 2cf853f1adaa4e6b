"""
The API server behaviour that kubetune relies on, checked on the emulator and, with
``--kubeconfig``, on a real cluster (every test that takes the ``cluster`` fixture runs on both).

Tests that take ``k8s_emulator`` are about the emulator itself (fault injection, discovery,
direct store access) and run only against it.
"""

from __future__ import annotations

import copy
import json
import pathlib
import threading
import time
import urllib.request
from typing import Any

import kmock
import kopf
import kopf.testing
import kubernetes
import pytest
import yaml
from kubernetes.client import ApiException

from tests.support.clusters import JSON_PATCH, Cluster
from tests.support.emulating import FINETUNEJOB_CRD, EmulatorThread

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FTJ = ("kubetune.io/v1alpha1", "FineTuneJob")
CM = ("v1", "ConfigMap")


def finetunejob(name: str) -> dict[str, Any]:
    """A FineTuneJob valid against the project's CRD schema (the quickstart example, renamed)."""
    manifest = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"] = {"name": name}
    return manifest


def configmap(name: str, **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **metadata}, "data": {"k": "v"}}


@pytest.fixture()
def crd_installed(cluster: Cluster) -> Cluster:
    """The FineTuneJob CRD is there (the emulator serves it already; a real cluster may need it)."""
    if not cluster.is_emulated:
        crd = yaml.safe_load((REPO_ROOT / "crds" / "finetunejobs.kubetune.io.yaml").read_text())
        cluster.ensure(crd)
        cluster.wait_for(lambda: _served(cluster), what="the FineTuneJob CRD to be served")
    return cluster


def _served(cluster: Cluster) -> bool:
    try:
        cluster.resolve(*FTJ)
        return True
    except (LookupError, ApiException):
        return False


# ---------------------------------------------------------------------------- metadata on writes

def test_create_fills_uid_resource_version_timestamp_and_generation(crd_installed: Cluster) -> None:
    cluster = crd_installed
    cm = cluster.create(configmap("plain"))
    job = cluster.create(finetunejob("job"))
    for obj in (cm, job):
        meta = obj["metadata"]
        assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"].endswith("Z")
        assert meta["namespace"] == cluster.namespace
    assert job["metadata"]["generation"] == 1
    assert int(job["metadata"]["resourceVersion"]) > int(cm["metadata"]["resourceVersion"])
    assert cluster.get(*FTJ, "job") == job


def test_generation_counts_spec_changes_only(crd_installed: Cluster) -> None:
    cluster = crd_installed
    created = cluster.create(finetunejob("gen"))
    labelled = cluster.patch(*FTJ, "gen", {"metadata": {"labels": {"team": "nlp"}}})
    assert labelled["metadata"]["generation"] == 1
    assert labelled["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    with_status = cluster.patch(*FTJ, "gen", {"status": {"phase": "Running"}}, subresource="status")
    assert with_status["metadata"]["generation"] == 1
    respecced = cluster.patch(*FTJ, "gen", {"spec": {"runPolicy": {"suspend": True}}})  # the mutable part
    assert respecced["metadata"]["generation"] == 2


def test_noop_patch_keeps_the_resource_version(cluster: Cluster) -> None:
    created = cluster.create(configmap("same"))
    patched = cluster.patch(*CM, "same", {"data": {"k": "v"}})
    assert patched["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


# ---------------------------------------------------------------------------- status subresource

def test_status_subresource_isolates_status_from_spec(crd_installed: Cluster) -> None:
    cluster = crd_installed
    manifest = finetunejob("iso")
    manifest["status"] = {"phase": "Succeeded"}
    created = cluster.create(manifest)
    assert "status" not in created or "phase" not in created["status"]

    main = cluster.patch(*FTJ, "iso", {"status": {"phase": "Failed"}, "metadata": {"labels": {"a": "b"}}})
    assert (main.get("status") or {}).get("phase") is None
    assert main["metadata"]["labels"] == {"a": "b"}

    status = cluster.patch(*FTJ, "iso", {"status": {"phase": "Running"}, "spec": {"runPolicy": {"suspend": True}}},
                           subresource="status")
    assert status["status"]["phase"] == "Running"
    assert "runPolicy" not in status["spec"] or "suspend" not in status["spec"]["runPolicy"]

    replaced = copy.deepcopy(status)
    replaced["status"] = {"phase": "Failed"}
    replaced["spec"]["runPolicy"] = {"suspend": True}
    after_put = cluster.replace(replaced)
    assert after_put["status"]["phase"] == "Running"
    assert after_put["spec"]["runPolicy"]["suspend"] is True


def test_unknown_fields_of_custom_resources_are_pruned(crd_installed: Cluster) -> None:
    """Fields the CRD schema does not declare are dropped silently, in spec and in status."""
    cluster = crd_installed
    manifest = finetunejob("pruned")
    manifest["spec"]["training"]["noSuchKnob"] = 1
    created = cluster.create(manifest)
    assert "noSuchKnob" not in created["spec"]["training"]
    assert created["spec"]["training"]["epochs"] == manifest["spec"]["training"]["epochs"]
    status = cluster.patch(*FTJ, "pruned", {"status": {"phase": "Running", "progress": {"step": 3, "stepz": 4},
                                                       "kopf": {"progress": {}}}}, subresource="status")
    assert status["status"] == {"phase": "Running", "progress": {"step": 3}}


def test_kubernetes_client_patches_custom_object_status(crd_installed: Cluster) -> None:
    cluster = crd_installed
    cluster.create(finetunejob("cli"))
    api = kubernetes.client.CustomObjectsApi(cluster.api_client)
    patched = api.patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", cluster.namespace, "finetunejobs", "cli",
        {"status": {"phase": "Running", "message": "step 3"}})
    assert patched["status"] == {"phase": "Running", "message": "step 3"}
    fetched = api.get_namespaced_custom_object_status("kubetune.io", "v1alpha1", cluster.namespace, "finetunejobs", "cli")
    assert fetched["status"]["message"] == "step 3"


def test_kubernetes_client_strategic_merge_patches_core_objects(cluster: Cluster) -> None:
    cluster.create(configmap("smp"))
    api = kubernetes.client.CoreV1Api(cluster.api_client)
    patched = api.patch_namespaced_config_map("smp", cluster.namespace, {"data": {"extra": "1"}})
    assert patched.data == {"k": "v", "extra": "1"}


# ---------------------------------------------------------------------------- errors

def test_duplicate_create_is_409_and_missing_is_404(cluster: Cluster) -> None:
    cluster.create(configmap("dup"))
    with pytest.raises(ApiException) as conflict:
        cluster.create(configmap("dup"))
    assert conflict.value.status == 409
    with pytest.raises(ApiException) as missing:
        cluster.get(*CM, "nope")
    assert missing.value.status == 404
    with pytest.raises(ApiException) as missing_patch:
        cluster.patch(*CM, "nope", {"data": {}})
    assert missing_patch.value.status == 404


def test_stale_resource_version_is_a_conflict(cluster: Cluster) -> None:
    created = cluster.create(configmap("occ"))
    stale = created["metadata"]["resourceVersion"]
    cluster.patch(*CM, "occ", {"data": {"k": "changed"}})
    with pytest.raises(ApiException) as patched:
        cluster.patch(*CM, "occ", {"metadata": {"resourceVersion": stale}, "data": {"k": "lost"}})
    assert patched.value.status == 409
    with pytest.raises(ApiException) as replaced:
        cluster.replace(created)
    assert replaced.value.status == 409
    assert cluster.get(*CM, "occ")["data"] == {"k": "changed"}


def test_failed_json_patch_test_is_422(cluster: Cluster) -> None:
    """kopf's optimistic concurrency: a ``test`` op on a stale resourceVersion must fail with 422."""
    created = cluster.create(configmap("jp"))
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": created["metadata"]["resourceVersion"]},
           {"op": "add", "path": "/metadata/finalizers", "value": ["kubetune.io/x"]}]
    assert cluster.patch(*CM, "jp", ops, content_type=JSON_PATCH)["metadata"]["finalizers"] == ["kubetune.io/x"]
    with pytest.raises(ApiException) as failed:
        cluster.patch(*CM, "jp", ops, content_type=JSON_PATCH)
    assert failed.value.status == 422
    cluster.patch(*CM, "jp", {"metadata": {"finalizers": None}})


def test_status_of_a_kind_without_status_subresource_is_404(cluster: Cluster) -> None:
    cluster.create(configmap("nostatus"))
    with pytest.raises(ApiException) as missing:
        cluster.patch(*CM, "nostatus", {"status": {"x": 1}}, subresource="status")
    assert missing.value.status == 404


def test_server_side_apply_creates_then_updates(cluster: Cluster) -> None:
    path = cluster.path(*CM, "applied")
    query = {"fieldManager": "kubetune-tests", "force": "true"}
    body = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  k: one\n"
    created = cluster.request("PATCH", path, body=body, query=query, content_type="application/apply-patch+yaml")
    assert created["data"] == {"k": "one"} and created["metadata"]["uid"]
    updated = cluster.request("PATCH", path, body=body.replace("one", "two"), query=query,
                              content_type="application/apply-patch+yaml")
    assert updated["data"] == {"k": "two"} and updated["metadata"]["uid"] == created["metadata"]["uid"]


def test_namespace_must_exist(cluster: Cluster) -> None:
    with pytest.raises(ApiException) as missing:
        cluster.create(configmap("lost"), namespace="kt-no-such-namespace")
    assert missing.value.status == 404


def test_custom_resource_replace_needs_a_resource_version(crd_installed: Cluster) -> None:
    cluster = crd_installed
    created = cluster.create(finetunejob("put"))
    unversioned = copy.deepcopy(created)
    del unversioned["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as invalid:
        cluster.replace(unversioned)
    assert invalid.value.status == 422


def test_generate_name_makes_a_unique_name(cluster: Cluster) -> None:
    first = cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}})
    second = cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}})
    assert first["metadata"]["name"].startswith("gen-") and len(first["metadata"]["name"]) > len("gen-")
    assert first["metadata"]["name"] != second["metadata"]["name"]


# ---------------------------------------------------------------------------- deletion

def test_finalizers_hold_deletion_until_removed(cluster: Cluster) -> None:
    cluster.create(configmap("fin", finalizers=["kubetune.io/cleanup"]))
    cluster.delete(*CM, "fin")
    held = cluster.get(*CM, "fin")
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"] == ["kubetune.io/cleanup"]
    with pytest.raises(ApiException) as forbidden:
        cluster.patch(*CM, "fin", {"metadata": {"finalizers": ["kubetune.io/cleanup", "kubetune.io/new"]}})
    assert forbidden.value.status == 422
    cluster.patch(*CM, "fin", {"metadata": {"finalizers": None}})
    cluster.wait_gone(*CM, "fin")


def test_owned_objects_are_garbage_collected(cluster: Cluster) -> None:
    owner = cluster.create(configmap("owner"))
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
                 "controller": True, "blockOwnerDeletion": True}
    cluster.create(configmap("child", ownerReferences=[reference]))
    cluster.create(configmap("bystander"))
    cluster.delete(*CM, "owner")
    cluster.wait_gone(*CM, "child", timeout=30)
    assert cluster.find(*CM, "bystander") is not None


def test_orphan_propagation_keeps_dependents(cluster: Cluster) -> None:
    owner = cluster.create(configmap("owner"))
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    cluster.create(configmap("child", ownerReferences=[reference]))
    cluster.delete(*CM, "owner", propagation_policy="Orphan")
    cluster.wait_gone(*CM, "owner", timeout=30)
    orphan = cluster.wait_for(lambda: (o := cluster.get(*CM, "child")) and not o["metadata"].get("ownerReferences") and o,
                              timeout=30, what="the child to lose its owner reference")
    assert orphan["metadata"]["name"] == "child"


# ---------------------------------------------------------------------------- list and watch

def test_label_selectors_filter_lists(cluster: Cluster) -> None:
    cluster.create(configmap("a", labels={"app": "kubetune", "tier": "trainer"}))
    cluster.create(configmap("b", labels={"app": "kubetune", "tier": "operator"}))
    cluster.create(configmap("c", labels={"app": "other"}))

    def names(selector: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in cluster.list(*CM, label_selector=selector))

    assert names("app=kubetune") == ["a", "b"]
    assert names("app=kubetune,tier!=trainer") == ["b"]
    assert names("tier in (trainer, operator)") == ["a", "b"]
    unlabelled = names("!tier")  # a real namespace also holds kube-root-ca.crt
    assert "c" in unlabelled and "a" not in unlabelled and "b" not in unlabelled
    assert names("app notin (kubetune),app") == ["c"]


def test_lists_page_with_limit_and_continue(cluster: Cluster) -> None:
    for index in range(5):
        cluster.create(configmap(f"page-{index}", labels={"paged": "yes"}))
    path, names, token = cluster.path(*CM), [], None
    while True:
        page = cluster.request("GET", path, query={"labelSelector": "paged=yes", "limit": 2, "continue": token})
        assert len(page["items"]) <= 2
        names += [item["metadata"]["name"] for item in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            break
    assert sorted(names) == [f"page-{i}" for i in range(5)]


def test_delete_collection_by_label(cluster: Cluster) -> None:
    cluster.create(configmap("doomed-1", labels={"doomed": "yes"}))
    cluster.create(configmap("doomed-2", labels={"doomed": "yes"}))
    cluster.create(configmap("kept"))
    cluster.request("DELETE", cluster.path(*CM), query={"labelSelector": "doomed=yes"})
    cluster.wait_for(lambda: not cluster.list(*CM, label_selector="doomed=yes"), what="the labelled ConfigMaps to go")
    assert cluster.find(*CM, "kept") is not None


def test_watch_continues_after_the_listed_resource_version(cluster: Cluster) -> None:
    cluster.create(configmap("before"))
    listed = cluster.request("GET", cluster.path(*CM))
    since = listed["metadata"]["resourceVersion"]
    cluster.create(configmap("after"))
    cluster.patch(*CM, "after", {"data": {"k": "2"}})
    cluster.delete(*CM, "after")

    api = kubernetes.client.CoreV1Api(cluster.api_client)
    events = []
    for event in kubernetes.watch.Watch().stream(api.list_namespaced_config_map, cluster.namespace,
                                                 resource_version=since, timeout_seconds=2):
        if event["object"].metadata.name in ("before", "after"):
            events.append((event["type"], event["object"].metadata.name))
        if len(events) == 3:
            break
    assert events == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "after")]


# ---------------------------------------------------------------------------- kopf round trip

@pytest.mark.parametrize("scope", ["namespaced", "cluster-wide"])
def test_kopf_operator_round_trip(crd_installed: Cluster, scope: str) -> None:
    """A kopf operator sees a FineTuneJob, creates an owned ConfigMap; deletion releases and GCs both."""
    cluster = crd_installed
    if scope == "cluster-wide" and not cluster.is_emulated:
        pytest.skip("a cluster-wide test operator would act on other people's FineTuneJobs")
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    # Returns nothing: kopf would store a result in status.<handler>, which the CRD schema prunes.
    @kopf.on.create("kubetune.io", "v1alpha1", "finetunejobs", registry=registry)
    def create_config(name: str, namespace: str, body: Any, **_: Any) -> None:
        child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"},
                 "data": {"job": name}}
        kopf.adopt(child, owner=body)
        kubernetes.client.CoreV1Api(cluster.api_client).create_namespaced_config_map(namespace, child)

    @kopf.on.delete("kubetune.io", "v1alpha1", "finetunejobs", registry=registry)
    def released(**_: Any) -> None:
        pass

    where = ["--namespace", cluster.namespace] if scope == "namespaced" else ["--all-namespaces"]
    args = ["run", "--standalone", *where, "--verbose"]
    with kopf.testing.KopfRunner(args, registry=registry, timeout=60) as runner:
        cluster.create(finetunejob("kopf"))
        config = cluster.wait_for(lambda: cluster.find(*CM, "kopf-config"), timeout=30,
                                  what="the operator to create the ConfigMap")
        job = cluster.get(*FTJ, "kopf")
        assert config["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        cluster.wait_for(lambda: cluster.get(*FTJ, "kopf")["metadata"].get("finalizers"), timeout=30,
                         what="kopf's finalizer on the job")
        cluster.delete(*FTJ, "kopf")
        cluster.wait_gone(*FTJ, "kopf", timeout=30)
        cluster.wait_gone(*CM, "kopf-config", timeout=30)
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


# ---------------------------------------------------------------------------- emulator only

def test_discovery_serves_the_resources_we_use(k8s_emulator: EmulatorThread, kubeconfig_file: pathlib.Path) -> None:
    cluster = Cluster(kubeconfig_file, namespace="default", emulator=k8s_emulator)
    expected = {
        ("kubetune.io/v1alpha1", "finetunejobs"): True, ("v1", "configmaps"): True, ("v1", "services"): True,
        ("v1", "persistentvolumeclaims"): True, ("v1", "serviceaccounts"): True, ("v1", "pods"): True,
        ("v1", "events"): True, ("events.k8s.io/v1", "events"): True, ("batch/v1", "jobs"): True,
        ("rbac.authorization.k8s.io/v1", "roles"): True, ("rbac.authorization.k8s.io/v1", "rolebindings"): True,
        ("coordination.k8s.io/v1", "leases"): True, ("apiextensions.k8s.io/v1", "customresourcedefinitions"): False,
        ("v1", "namespaces"): False,
    }
    for (api_version, plural), namespaced in expected.items():
        assert cluster.resolve(api_version, plural) == (plural, namespaced)
    versions = cluster.request("GET", "/apis/kubetune.io/v1alpha1")["resources"]
    assert {r["name"] for r in versions} == {"finetunejobs", "finetunejobs/status"}
    groups = {g["name"] for g in cluster.request("GET", "/apis")["groups"]}
    assert {"kubetune.io", "batch", "rbac.authorization.k8s.io", "coordination.k8s.io", "events.k8s.io"} <= groups
    cluster.close()


def test_creating_a_crd_serves_its_resource(cluster: Cluster) -> None:
    if not cluster.is_emulated:
        pytest.skip("creating CRDs on a shared real cluster is not this test's business")
    crd = copy.deepcopy(FINETUNEJOB_CRD)
    crd["metadata"]["name"] = "widgets.example.io"
    crd["spec"].update(group="example.io", names={"plural": "widgets", "singular": "widget", "kind": "Widget"})
    stored = cluster.create(crd)
    assert {c["type"] for c in stored["status"]["conditions"]} == {"NamesAccepted", "Established"}
    widget = cluster.create({"apiVersion": "example.io/v1alpha1", "kind": "Widget", "metadata": {"name": "w"}})
    assert widget["metadata"]["generation"] == 1
    cluster.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", "widgets.example.io")
    with pytest.raises(ApiException) as gone:
        cluster.request("GET", f"/apis/example.io/v1alpha1/namespaces/{cluster.namespace}/widgets/w")
    assert gone.value.status == 404


def test_batch_jobs_orphan_their_pods_by_default(k8s_emulator: EmulatorThread) -> None:
    """As the apiserver: DELETE of a batch/v1 Job without propagationPolicy orphans its pods."""
    job = k8s_emulator.create_object("batch/v1/jobs", "default", {"metadata": {"name": "j"}, "spec": {}})
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": job["metadata"]["uid"]}
    k8s_emulator.create_object("v1/pods", "default", {"metadata": {"name": "p1", "ownerReferences": [owner]}})
    k8s_emulator.create_object("v1/pods", "default", {"metadata": {"name": "p2", "ownerReferences": [owner]}})
    k8s_emulator.delete_object("batch/v1/jobs", "default", "j")
    assert "ownerReferences" not in k8s_emulator.get_object("v1/pods", "default", "p1")["metadata"]
    k8s_emulator.create_object("batch/v1/jobs", "default", {"metadata": {"name": "j"}, "spec": {}})
    again = k8s_emulator.get_object("batch/v1/jobs", "default", "j")
    owner["uid"] = again["metadata"]["uid"]
    k8s_emulator.patch_object("v1/pods", "default", "p2", {"metadata": {"ownerReferences": [owner]}})
    k8s_emulator.delete_object("batch/v1/jobs", "default", "j", propagation_policy="Background")
    assert k8s_emulator.get_object("v1/pods", "default", "p2") is None


def test_reactions_override_the_emulation_for_fault_injection(k8s_emulator: EmulatorThread,
                                                              kubeconfig_file: pathlib.Path) -> None:
    emulator = k8s_emulator.emulator
    assert emulator is not None
    cluster = Cluster(kubeconfig_file, namespace="default", emulator=k8s_emulator)
    cluster.create(configmap("flaky"))
    emulator["patch", kmock.resource("", "v1", "configmaps")][:1] << 503 << {"kind": "Status", "code": 503}
    with pytest.raises(ApiException) as failed:
        cluster.patch(*CM, "flaky", {"data": {"k": "1"}})
    assert failed.value.status == 503
    assert cluster.get(*CM, "flaky")["data"] == {"k": "v"}  # the failed request changed nothing
    assert cluster.patch(*CM, "flaky", {"data": {"k": "2"}})["data"] == {"k": "2"}  # the fault was one-shot
    cluster.close()


def test_watch_sends_bookmarks_and_ends_on_timeout(k8s_emulator: EmulatorThread) -> None:
    assert k8s_emulator.emulator is not None
    k8s_emulator.emulator.bookmark_interval = 0.2
    k8s_emulator.create_object("v1/configmaps", "default", configmap("x"))
    started = time.monotonic()
    url = (f"{k8s_emulator.url}/api/v1/namespaces/default/configmaps?watch=true&allowWatchBookmarks=true"
           "&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1")
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
    assert 0.9 < time.monotonic() - started < 5
    assert lines[0]["type"] == "ADDED" and lines[0]["object"]["metadata"]["name"] == "x"
    assert lines[1]["type"] == "BOOKMARK"
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert sum(line["type"] == "BOOKMARK" for line in lines[2:]) >= 2


def test_direct_store_access_emits_watch_events(k8s_emulator: EmulatorThread, kubeconfig_file: pathlib.Path) -> None:
    """Objects arranged through the helpers are seen by clients' watches like any other write."""
    received: list[tuple[str, str]] = []
    api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(kubeconfig_file)))
    ready = threading.Event()

    def watch() -> None:
        stream = kubernetes.watch.Watch().stream(api.list_namespaced_config_map, "default", timeout_seconds=3)
        ready.set()
        for event in stream:
            received.append((event["type"], event["object"].metadata.name))
            if len(received) == 2:
                return

    thread = threading.Thread(target=watch)
    thread.start()
    ready.wait()
    time.sleep(0.2)
    k8s_emulator.create_object("v1/configmaps", "default", configmap("seen"))
    k8s_emulator.patch_object("v1/configmaps", "default", "seen", {"data": {"k": "w"}})
    thread.join(5)
    assert received == [("ADDED", "seen"), ("MODIFIED", "seen")]


def test_writes_never_change_a_stored_version_or_share_it_with_callers(k8s_emulator: EmulatorThread) -> None:
    """The write paths read the stored version without copying it (a copy per step was most of a
    write's cost): every earlier version, and what a caller got back, stay as they were."""
    created = k8s_emulator.create_object("batch/v1/jobs", "default", {
        "metadata": {"name": "kept", "labels": {"a": "1"}}, "spec": {"template": {"spec": {"containers": [{"name": "c"}]}}}})
    status = k8s_emulator.patch_object("batch/v1/jobs", "default", "kept", {"status": {"active": 1}, "spec": {"x": 1}},
                                       subresource="status")
    assert status["status"] == {"active": 1} and "x" not in status["spec"]  # a status write touches status only
    status["spec"]["template"]["spec"]["containers"][0]["name"] = "changed by the caller"
    spec = k8s_emulator.patch_object("batch/v1/jobs", "default", "kept", {"metadata": {"labels": {"b": "2"}},
                                                                         "status": {"active": 9}})
    assert spec["status"] == {"active": 1} and spec["metadata"]["labels"] == {"a": "1", "b": "2"}
    stored = k8s_emulator.call(lambda: k8s_emulator.emulator.objects[  # type: ignore[union-attr]
        next(k for k in k8s_emulator.emulator.objects if k[2] == "kept")])  # type: ignore[union-attr]
    versions = list(stored.history)  # every version, the first to the current
    assert [v["status"] if "status" in v else None for v in versions] == [None, {"active": 1}, {"active": 1}]
    assert all(v["spec"]["template"]["spec"]["containers"][0]["name"] == "c" for v in versions)
    assert [v["metadata"].get("labels") for v in versions] == [{"a": "1"}, {"a": "1"}, {"a": "1", "b": "2"}]
    assert created["metadata"]["resourceVersion"] < status["metadata"]["resourceVersion"] < spec["metadata"]["resourceVersion"]
