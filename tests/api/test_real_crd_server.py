"""
kubetune's CRD and objects on the real Kubernetes CRD server (``apiextensions-apiserver`` + etcd).

The other API tests judge the CRD schema with jsonschema and the emulator, which neither
validates nor compiles CEL. Here the Kubernetes code does: the CRD must install (structural
schema, CEL rules within their cost budget), every example must be accepted with strict field
validation and stored as written, the server and the pydantic models must agree on mutated specs,
the immutability rules must hold on update, the status the operator writes must survive pruning
whole, and the status subresource and resourceVersion conflicts must behave as the emulator
claims (those tests run on both, via ``crd_backend``). Run with ``--crd-server DIR``
(``tests/support/build_crd_server.sh``); without it only the emulator half runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from kubernetes.client import ApiException

from kubetune.api import KIND, load_documents
from kubetune.api.crds import build_crd
from kubetune.api.statuses import CheckpointRecord, Condition, FineTuneJobStatus, Initialization, Progress, TrialRecord
from tests.api.test_crd_agreement import _models_accept, _mutated, server_decoded
from tests.support.apiserver import CrdApiServer
from tests.support.clusters import Cluster, fresh_namespace_name
from tests.support.emulating import prune

ROOT = Path(__file__).resolve().parents[2]
API_VERSION = "kubetune.io/v1alpha1"
CRD_NAME = "finetunejobs.kubetune.io"
STRICT = {"fieldValidation": "Strict"}
MINIMAL = {"model": {"source": "hf://org/model"}, "data": {"datasets": [{"source": "data/train.jsonl", "format": "text"}]}}


def _job(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": copy.deepcopy(spec)}


def _example_jobs() -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for index, document in enumerate(load_documents(path.read_text(), str(path))):
            if isinstance(document.body, dict) and document.body.get("kind") == KIND:
                jobs.append((f"{path.relative_to(ROOT)}#{index}", document.body))
    return jobs


EXAMPLE_JOBS = _example_jobs()


def _contains(stored: Any, sent: Any) -> bool:
    """Everything sent is in ``stored`` unchanged (the server may add defaults, never drop or alter)."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(k in stored and _contains(stored[k], v) for k, v in sent.items())
    if isinstance(sent, list):
        return isinstance(stored, list) and len(stored) == len(sent) and all(_contains(a, b) for a, b in zip(stored, sent))
    return bool(stored == sent)


@pytest.fixture()
def real(crd_server: CrdApiServer) -> Any:
    cluster = Cluster(crd_server.kubeconfig_path, namespace=fresh_namespace_name())
    try:
        yield cluster
    finally:
        cluster.close()


def _create(cluster: Cluster, body: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    query = dict(STRICT, **({"dryRun": "All"} if dry_run else {}))
    return cluster.request("POST", cluster.path(API_VERSION, KIND), body=body, query=query)


# ---------------------------------------------------------------- the CRD itself


@pytest.mark.crdserver
def test_the_crd_installs_structural_and_established(real: Cluster) -> None:
    crd = real.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", CRD_NAME)
    conditions = {c["type"]: c for c in crd["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True"
    assert "NonStructuralSchema" not in conditions, conditions.get("NonStructuralSchema")
    plural, namespaced = real.resolve(API_VERSION, KIND)
    assert (plural, namespaced) == ("finetunejobs", True)


# ---------------------------------------------------------------- specs


@pytest.mark.crdserver
@pytest.mark.parametrize("name, body", EXAMPLE_JOBS, ids=[n for n, _ in EXAMPLE_JOBS])
def test_every_example_is_accepted_strictly_and_stored_as_written(real: Cluster, name: str, body: dict[str, Any]) -> None:
    sent = copy.deepcopy(body)
    sent["metadata"] = {"name": sent["metadata"]["name"]}
    stored = _create(real, sent, dry_run=True)
    assert _contains(stored["spec"], server_decoded(sent["spec"])), (name, stored["spec"])


SERVER_SAMPLE = settings(max_examples=60, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _server_accepts(cluster: Cluster, spec: Any) -> bool:
    try:
        _create(cluster, _job("sample", spec), dry_run=True)
    except ApiException as exc:
        assert exc.status in (400, 422), exc.body  # a verdict, not a server error
        return False
    return True


@pytest.mark.crdserver
@pytest.mark.slow
@SERVER_SAMPLE
@given(spec=_mutated())
def test_the_real_server_and_the_models_agree_on_mutated_specs(crd_server: CrdApiServer, spec: Any) -> None:
    cluster = Cluster(crd_server.kubeconfig_path, namespace="kt-real-crd")
    try:
        assert _server_accepts(cluster, spec) == _models_accept(server_decoded(spec)), spec
    finally:
        cluster.close()


@pytest.mark.crdserver
def test_the_server_decodes_an_integral_float_as_an_integer(real: Cluster) -> None:
    """What ``server_decoded`` assumes (found by the mutated-spec sample): 0.0 for an integer field
    is accepted and stored as 0; 1.5 is refused, as by the models."""
    stored = _create(real, _job("integral", dict(MINIMAL, runPolicy={"ttlSecondsAfterFinished": 0.0})), dry_run=True)
    assert stored["spec"]["runPolicy"] == {"ttlSecondsAfterFinished": 0} and isinstance(stored["spec"]["runPolicy"]["ttlSecondsAfterFinished"], int)
    assert not _server_accepts(real, dict(MINIMAL, runPolicy={"ttlSecondsAfterFinished": 1.5}))
    assert not _models_accept(dict(MINIMAL, runPolicy={"ttlSecondsAfterFinished": 1.5}))


@pytest.mark.crdserver
def test_null_for_a_nullable_enum_is_accepted(real: Cluster) -> None:
    """The models accept `head: null` (None, the default); the server must too (it once did not),
    dropping it, which means the same."""
    spec = dict(MINIMAL, model={"source": "hf://org/model", "head": None})
    assert _models_accept(spec)
    stored = _create(real, _job("null-enum", spec), dry_run=True)
    assert stored["spec"]["model"] == {"source": "hf://org/model"}
    with pytest.raises(ApiException) as refused:
        _create(real, _job("bad-enum", dict(MINIMAL, model={"source": "hf://org/model", "head": "regression"})), dry_run=True)
    assert refused.value.status == 422 and "spec.model.head" in refused.value.body


@pytest.mark.crdserver
@pytest.mark.parametrize("spec", [
    dict(MINIMAL, techniques={"layerSelection": {"layers": ["-\U0001e951\u0de6"]}}),  # Unicode digits: \\d is ASCII in RE2
    dict(MINIMAL, resources={"image": "repo/img\u00a0:1"}),  # a no-break space: \\s is ASCII in RE2
    dict(MINIMAL, resources={"image": "repo/img:1"}),
    dict(MINIMAL, techniques={"layerSelection": {"layers": ["-2:", "0:4"]}}),
])
def test_patterns_agree_with_the_models_on_unicode(real: Cluster, spec: dict[str, Any]) -> None:
    assert _server_accepts(real, spec) == _models_accept(spec), spec


@pytest.mark.crdserver
@pytest.mark.parametrize("field, value", [
    ("model", {"source": "hf://org/other"}),
    ("data", {"datasets": [{"source": "data/other.jsonl", "format": "text"}]}),
    ("peft", {"method": "lora"}),
    ("training", {"maxSteps": 7}),
])
def test_immutable_spec_fields_are_refused_on_update_by_cel(real: Cluster, field: str, value: Any) -> None:
    name = f"immutable-{field}"
    _create(real, _job(name, MINIMAL))
    with pytest.raises(ApiException) as refused:
        real.patch(API_VERSION, KIND, name, {"spec": {field: value}})
    assert refused.value.status == 422
    assert f"spec.{field}" in refused.value.body and "immutable" in refused.value.body
    changed = real.patch(API_VERSION, KIND, name, {"spec": {"runPolicy": {"suspend": True}}})
    assert changed["spec"]["runPolicy"]["suspend"] is True


# ---------------------------------------------------------------- status and conflicts, on both backends


def _full_status() -> dict[str, Any]:
    """A status with every field the operator and trainer can write, as they serialise it."""
    trial = TrialRecord(index=1, parameters={"training.learningRate": "0.0001"}, metric=0.5, state="Pruned",
                        intermediate={"10": 0.7}, pruned_at_step=10)
    status = FineTuneJobStatus(
        phase="Running", message="training", techniques="lora",
        conditions=[Condition(type="Running", status="True", reason="Started", message="m",
                              last_transition_time="2026-01-01T00:00:00Z", observed_generation=1)],
        initialization=Initialization(sources_total=2, sources_fetched=1, bytes_fetched=10, current="hf://org/model", done=False),
        progress=Progress(step=5, total_steps=10, epoch=0.5, percent=50.0, loss=1.25, eval_loss=1.5, eval_step=4,
                          metrics={"accuracy": 0.75}, learning_rate=0.0001, tokens_per_second=123.5, eta_seconds=30.0,
                          updated_at="2026-01-01T00:00:00Z", stop_reason="completed"),
        checkpoints=[CheckpointRecord(step=4, path="checkpoints/step-4", metrics={"eval_loss": 1.5}, time="2026-01-01T00:00:00Z")],
        latest_checkpoint="checkpoints/step-4", best_checkpoint="checkpoints/step-4", output_path="output",
        trials=[trial], best_trial=trial, start_time="2026-01-01T00:00:00Z", completion_time="2026-01-01T01:00:00Z",
        restarts=1, observed_generation=1,
    )
    written = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    every_field = set(FineTuneJobStatus.model_fields)
    assert {f for f in every_field if getattr(status, f) in (None, [], 0)} == set(), "fill every status field"
    return written


def _status_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def test_every_status_field_the_operator_writes_survives_pruning(crd_backend: Cluster) -> None:
    name = "status-pruning"
    crd_backend.create(_job(name, MINIMAL))
    status = _full_status()
    sent = dict(status, unknownField="dropped")
    sent["progress"] = dict(status["progress"], alsoUnknown=1)
    written = crd_backend.patch(API_VERSION, KIND, name, {"status": sent}, subresource="status")
    assert written["status"] == status
    assert written["status"] == prune(sent, _status_schema())  # the emulator's pruning, checked on the real server too


def test_status_subresource_separates_spec_and_status(crd_backend: Cluster) -> None:
    name = "subresource"
    created = crd_backend.create(dict(_job(name, MINIMAL), status={"phase": "Succeeded"}))
    assert "status" not in created or created["status"] in ({}, None)  # status on create is dropped
    assert created["metadata"]["generation"] == 1
    on_main = crd_backend.patch(API_VERSION, KIND, name, {"status": {"phase": "Failed"}, "spec": {"runPolicy": {"suspend": True}}})
    assert on_main.get("status") in (None, {}) and on_main["spec"]["runPolicy"]["suspend"] is True
    assert on_main["metadata"]["generation"] == 2
    on_status = crd_backend.patch(API_VERSION, KIND, name, {"status": {"phase": "Running"}, "spec": {"runPolicy": {"suspend": False}}},
                                  subresource="status")
    assert on_status["status"] == {"phase": "Running"} and on_status["spec"]["runPolicy"]["suspend"] is True
    assert on_status["metadata"]["generation"] == 2  # a status write is not a new spec generation


def test_stale_resource_version_is_a_409_conflict(crd_backend: Cluster) -> None:
    name = "conflict"
    first = crd_backend.create(_job(name, MINIMAL))
    crd_backend.patch(API_VERSION, KIND, name, {"spec": {"runPolicy": {"suspend": True}}})
    stale = copy.deepcopy(first)
    stale["spec"]["runPolicy"] = {"suspend": False}
    with pytest.raises(ApiException) as put:
        crd_backend.replace(stale)
    assert put.value.status == 409
    with pytest.raises(ApiException) as patched:
        crd_backend.patch(API_VERSION, KIND, name, {"metadata": {"resourceVersion": first["metadata"]["resourceVersion"]},
                                                     "status": {"phase": "Running"}}, subresource="status")
    assert patched.value.status == 409
    with pytest.raises(ApiException) as duplicate:
        crd_backend.create(_job(name, MINIMAL))
    assert duplicate.value.status == 409
