"""The GitOps and Kueue integrations: the Argo CD health check runs and says the right thing for
every phase, the Kustomize folder renders into valid FineTuneJobs, the Argo CD and Flux objects
point at paths that exist, and the Kueue example's job lands in a queue that can admit it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

from kubetune.api import KUEUE_QUEUE_LABEL, PHASES, parse_job, validate_manifest
from kubetune.operator.building import build_job
from tests.chart import toolchain

ROOT = toolchain.ROOT
GITOPS = ROOT / "examples" / "gitops"
KUEUE = ROOT / "examples" / "kueue"
LUA = (GITOPS / "finetunejob-health.lua").read_text()


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- Argo CD health ---------------------------------------------------------------------------


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the check as Argo CD does: the object as the global ``obj``, the script returns ``hs``."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(LUA)
    return str(hs["status"]), str(hs["message"])


def job(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                            "metadata": {"name": "j", "generation": generation}, "spec": {}}
    if status is not None:
        body["status"] = status
    return body


def test_argocd_cm_embeds_the_lua_file_verbatim() -> None:
    (cm,) = _docs(GITOPS / "argocd-cm.yaml")
    assert cm["data"]["resource.customizations.health.kubetune.io_FineTuneJob"] == LUA


@pytest.mark.parametrize(
    ("status", "expected", "message"),
    [
        (None, "Progressing", "Waiting for the kubetune operator"),
        ({}, "Progressing", "Waiting for the kubetune operator"),
        ({"phase": "Pending", "conditions": [{"type": "Created", "status": "True", "reason": "QueuedForAdmission",
                                              "message": "waiting for Kueue to admit the job (queue ml-queue)"}]},
         "Progressing", "Pending: waiting for Kueue to admit the job (queue ml-queue)"),
        ({"phase": "Initializing"}, "Progressing", "Initializing"),
        ({"phase": "Running", "progress": {"percent": 42.4, "step": 424, "totalSteps": 1000}},
         "Progressing", "Training: 42% (step 424 of 1000)"),
        ({"phase": "Running"}, "Progressing", "Training"),
        ({"phase": "Succeeded", "conditions": [{"type": "Succeeded", "status": "True", "message": "trained 1000 steps"}]},
         "Healthy", "trained 1000 steps"),
        ({"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": "OOMKilled",
                                             "message": "pod j-0 was OOMKilled"}]},
         "Degraded", "Training failed: pod j-0 was OOMKilled"),
        ({"phase": "Failed"}, "Degraded", "Training failed"),
        ({"phase": "Suspended"}, "Suspended", "Suspended"),
        ({"phase": "Running", "conditions": [{"type": "SpecRejected", "status": "True",
                                              "message": "spec.training is immutable"}]},
         "Degraded", "Spec rejected: spec.training is immutable"),
    ],
    ids=["no-status", "no-phase", "queued", "initializing", "running-progress", "running", "succeeded",
         "failed-oom", "failed", "suspended", "rejected"],
)
def test_argocd_health_follows_the_phase(status: dict[str, Any] | None, expected: str, message: str) -> None:
    got, text = health(job(status))
    assert got == expected
    assert text.startswith(message), text


def test_argocd_health_waits_for_a_new_generation_to_be_observed() -> None:
    assert health(job({"phase": "Succeeded", "observedGeneration": 1}, generation=2))[0] == "Progressing"
    assert health(job({"phase": "Succeeded", "observedGeneration": 2}, generation=2))[0] == "Healthy"


def test_every_phase_has_an_argocd_health() -> None:
    statuses = {health(job({"phase": phase}))[0] for phase in PHASES}
    assert statuses <= {"Progressing", "Healthy", "Degraded", "Suspended"}
    assert {"Healthy", "Degraded", "Suspended"} <= statuses


# --- Kustomize, Argo CD and Flux objects ------------------------------------------------------


def test_kustomize_folder_renders_valid_finetunejobs() -> None:
    out = subprocess.run([str(toolchain.kubectl()), "kustomize", str(GITOPS / "jobs")],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    jobs = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "FineTuneJob"]
    assert jobs
    for manifest in jobs:
        parsed, problems = validate_manifest(manifest)
        assert problems == [] and parsed is not None
        assert parsed.namespace == "team-a"
        assert manifest["metadata"]["labels"]["team"] == "team-a"


def test_argocd_and_flux_point_at_paths_in_this_repository() -> None:
    applications = _docs(GITOPS / "argocd-applications.yaml")
    assert {a["kind"] for a in applications} == {"Application"}
    for app in applications:
        assert (ROOT / app["spec"]["source"]["path"]).is_dir(), app["spec"]["source"]["path"]
    flux = {d["kind"]: d for d in _docs(GITOPS / "flux.yaml")}
    assert (ROOT / flux["HelmRelease"]["spec"]["chart"]["spec"]["chart"] / "Chart.yaml").is_file()
    assert (ROOT / flux["Kustomization"]["spec"]["path"] / "kustomization.yaml").is_file()
    source = flux["GitRepository"]["metadata"]["name"]
    assert flux["HelmRelease"]["spec"]["chart"]["spec"]["sourceRef"]["name"] == source
    assert flux["Kustomization"]["spec"]["sourceRef"]["name"] == source
    (expr,) = flux["Kustomization"]["spec"]["healthCheckExprs"]
    assert (expr["apiVersion"], expr["kind"]) == ("kubetune.io/v1alpha1", "FineTuneJob")
    for phase in PHASES:  # every phase is classified by exactly one expression
        hits = [k for k in ("current", "inProgress", "failed") if f"'{phase}'" in expr[k]]
        assert len(hits) == 1, (phase, hits)


# --- Kueue --------------------------------------------------------------------------------------


def _quantity(value: Any) -> float:
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_queued_job_names_a_local_queue_whose_cluster_queue_can_admit_all_its_pods() -> None:
    queues = _docs(KUEUE / "queues.yaml")
    (manifest,) = _docs(KUEUE / "queued-finetunejob.yaml")
    job_ = parse_job(manifest)
    (local,) = [q for q in queues if q["kind"] == "LocalQueue"]
    assert job_.queue_name == local["metadata"]["name"] and job_.namespace == local["metadata"]["namespace"]
    (cluster_queue,) = [q for q in queues if q["kind"] == "ClusterQueue"]
    assert local["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]

    trainer = build_job(job_)
    assert trainer["metadata"]["labels"][KUEUE_QUEUE_LABEL] == local["metadata"]["name"]
    assert trainer["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    pods = trainer["spec"]["parallelism"]
    requests = trainer["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    quota = {r["name"]: _quantity(r["nominalQuota"])
             for group in cluster_queue["spec"]["resourceGroups"] for f in group["flavors"] for r in f["resources"]}
    for resource, amount in requests.items():
        assert resource in quota, f"the ClusterQueue does not cover {resource}"
        assert _quantity(amount) * pods <= quota[resource], resource
