"""The real operator on fuzzed manifests that got past the CRD schema (no webhook in the way).

A sample of the mutated manifests of ``tests/api/test_fuzzing.py`` (same hypothesis strategy,
derandomized) is kept when the API server would store it: a valid object name and labels, and a
spec the CRD's OpenAPI schema accepts (``jsonschema``; unknown fields are then pruned by the
emulator as by the API server). They are applied to the emulator together, with the operator
running and no admission webhook — as on a cluster where the webhook is off or fails open. For
each, the operator either makes all its children (``Created``) or refuses it with a
``SpecRejected`` condition whose message names the field path, phase Failed, and no child at all.
It never crashes (no traceback in its log) and never stalls (a job applied after all of them is
still served). ``KUBETUNE_OPERATOR_FUZZ_EXAMPLES`` sets the sample size (default 40, out of 1,000 drawn: every one the
models refuse comes first, then valid ones).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from kubetune.api import ConditionType, validate_manifest
from kubetune.operator import naming, searching
from tests.api.test_crd_agreement import _schema_accepts
from tests.api.test_fuzzing import manifests
from tests.operator.operating import FTJ, condition, manifest, status
from tests.support.clusters import Cluster

Operator = Callable[..., Any]
SAMPLE = int(os.environ.get("KUBETUNE_OPERATOR_FUZZ_EXAMPLES", "40"))
DRAWN = max(1000, SAMPLE * 25)  # about a third pass the CRD schema; a few of those the models refuse
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
CHILD_KINDS = [("batch/v1", "Job"), ("v1", "ConfigMap"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"),
               ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
               ("rbac.authorization.k8s.io/v1", "RoleBinding")]


def _label_ok(key: Any, value: Any) -> bool:
    if not isinstance(key, str) or not (value is None or isinstance(value, str)):
        return False
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(LABEL_KEY_NAME.match(name)) and (value is None or (len(value) <= 63 and bool(LABEL_VALUE.match(value))))


def storable(body: Any, index: int, taken: set[str]) -> dict[str, Any] | None:
    """The object the API server would store for ``body`` (None where it would refuse it): name
    and labels by the API server's own rules, the spec by the CRD schema."""
    if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict) or "spec" not in body:
        return None
    meta = body["metadata"]
    name = meta.get("name")
    if not (isinstance(name, str) and len(name) <= 253 and DNS_SUBDOMAIN.match(name)) or name in taken:
        name = f"fz-{index}"
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, dict) and all(_label_ok(k, v) for k, v in labels.items())):
        return None
    if not _schema_accepts(body["spec"]):
        return None
    taken.add(name)
    out_meta: dict[str, Any] = {"name": name}
    if labels:
        out_meta["labels"] = {k: v or "" for k, v in labels.items()}
    return {"apiVersion": FTJ[0], "kind": FTJ[1], "metadata": out_meta, "spec": body["spec"]}


def children_of(cluster: Cluster, name: str) -> list[str]:
    selector = f"{naming.LABEL_JOB}={naming.label_value(name)}"
    return [f"{kind}/{o['metadata']['name']}" for api, kind in CHILD_KINDS for o in cluster.list(api, kind, label_selector=selector)]


def decided(cluster: Cluster, name: str) -> str | None:
    created = condition(cluster, name, ConditionType.CREATED)
    rejected = condition(cluster, name, ConditionType.SPEC_REJECTED)
    if rejected and rejected["status"] == "True":
        return "rejected"
    if created and created["status"] == "True":
        return "created"
    return None


def sample(size: int, drawn: int) -> list[dict[str, Any]]:
    """``size`` storable manifests out of ``drawn`` examples of the fuzz strategy (deterministic)."""
    found: list[Any] = []

    @settings(max_examples=drawn, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(manifests())
    def collect(body: dict[str, Any]) -> None:
        found.append(body)

    collect()
    taken: set[str] = set()
    bodies = [b for i, raw in enumerate(found) if (b := storable(raw, i, taken)) is not None]
    # the refused ones first: they are what the CRD schema let through and the models do not
    bodies.sort(key=lambda b: validate_manifest(b)[0] is not None)
    return bodies[:size]


@pytest.mark.slow
def test_fuzzed_manifests_past_the_crd_schema_are_served_or_refused_by_field_path(
        emulated_cluster: Cluster, operator_process: Operator) -> None:
    cluster = emulated_cluster
    bodies = sample(SAMPLE, DRAWN)
    assert len(bodies) == SAMPLE, f"only {len(bodies)} of {DRAWN} drawn manifests pass the CRD schema"
    outcomes: dict[str, int] = {"created": 0, "rejected": 0}
    with operator_process(cluster.namespace):
        stored = [cluster.create(body) for body in bodies]
        cluster.create(manifest("after-the-fuzz"))
        for obj in stored:
            name = obj["metadata"]["name"]
            how = cluster.wait_for(lambda n=name: decided(cluster, n), timeout=60, what=f"a decision on {name}")
            outcomes[how] += 1
            meta = {k: obj["metadata"][k] for k in ("name", "namespace", "labels") if k in obj["metadata"]}
            job, problems = validate_manifest({**{k: obj[k] for k in ("apiVersion", "kind", "spec")}, "metadata": meta})
            if job is not None:
                assert how == "created", (name, status(cluster, name))
                if searching.is_search(obj):  # a search makes trials (FineTuneJobs), each its own Job
                    cluster.wait_for(lambda n=name: [t for t in cluster.list(*FTJ) if searching.parent_name(t) == n],
                                     timeout=30, what=f"the first trial of {name}")
                else:
                    assert cluster.find("batch/v1", "Job", naming.names_for(name).job) is not None
                continue
            assert how == "rejected", (name, problems)
            message = condition(cluster, name, ConditionType.SPEC_REJECTED)["message"]  # type: ignore[index]
            assert problems[0].path in message, (message, problems[0])
            assert status(cluster, name)["phase"] == "Failed"
            assert children_of(cluster, name) == [], "a refused manifest left half-made objects"
        cluster.wait_for(lambda: decided(cluster, "after-the-fuzz") == "created", timeout=30, what="the operator still serving")
    print(f"\noperator fuzz: {SAMPLE} manifests past the CRD schema (of {DRAWN} drawn): "
          f"{outcomes['created']} created, {outcomes['rejected']} refused with SpecRejected")
