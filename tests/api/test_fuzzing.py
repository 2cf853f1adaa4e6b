"""Hostile and broken manifests: each is refused with field-path problems, or makes objects the API
server accepts.

Manifests start from the shipped examples (every technique) and are mutated with hypothesis: a
value replaced by one of the wrong type, a huge string or number, unicode, NaN/infinity or a deeply
nested structure; a key deleted or an unknown one added; names at and past the 63/253-character
limits and injection-looking names. Each goes through what ``kubetune validate`` runs
(``validate_manifest``), what the admission webhook answers (``admitting.review``) and, when valid,
the operator's builders (``building.plan``). Properties: nothing raises; an invalid manifest gets
problems whose paths name a field and whose messages stay short (a 100 kB string is not echoed
back); the webhook agrees with validate; a valid one's spec passes the CRD schema and every built
object passes ``kubernetes-validate`` (strict, offline OpenAPI schemas).

CI runs ``KUBETUNE_FUZZ_EXAMPLES`` (default 200) examples; the figure in docs/reliability.md comes
from ``KUBETUNE_FUZZ_EXAMPLES=10000 pytest -s -p no:cacheprovider --timeout=3600 tests/api/test_fuzzing.py -k mutated``
(about 5 minutes of CPU; the default per-test timeout of 600 s is too short on a loaded machine).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api.problems import format_path
from kubetune.api.validating import validate_manifest
from kubetune.operator import admitting, building
from tests.api.test_crd_agreement import _schema_accepts

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"
EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "200"))
UID = "0b8a6d1e-5a1c-4c3e-9d0e-2f1d2c3b4a59"
ROOTS = ("spec", "metadata", "apiVersion", "kind", "(root)")


def _bases() -> list[dict[str, Any]]:
    bodies = []
    for path in sorted(REPO.glob("examples/**/*.yaml")):
        for body in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(body, dict) and body.get("kind") == "FineTuneJob" and validate_manifest(body)[0] is not None:
                body.setdefault("metadata", {}).update(namespace="ml", uid=UID, generation=1)
                bodies.append(body)
    assert len(bodies) >= 15
    return bodies


BASES = _bases()


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": [value]}
    return value


_hostile = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([2**63, -(2**63) - 1, 10**300, -1, 0]),
    st.floats(), st.sampled_from([math.inf, -math.inf, math.nan, 1e308, 5e-324]),
    st.text(max_size=30), st.text(alphabet=st.characters(min_codepoint=0x80), max_size=30),
    st.sampled_from(["x" * 100_000, "a" * 63, "a" * 64, "a" * 253, "a" * 254, "../../etc/passwd", "/etc/shadow",
                     "$(whoami)", "; rm -rf /", "`id`", "{{ .Values }}", "${HOME}", "a\nb", "\x00", "🙂" * 20,
                     "hf://org/model;curl evil", "pvc://../x", "pvc://claim/../../etc", "s3://b/k", "1e9999"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.integers(min_value=20, max_value=150).map(_deep),
)

_names = st.one_of(
    st.sampled_from(["a" * 63, "a" * 64, "a" * 253, "a" * 254, "a-" * 31 + "b", "A", "-a", "a-", "a.b", "a_b",
                     "a/b", "../x", "$(id)", "ünï", "x" * 100_000, ""]),
    st.from_regex(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True),
    st.text(max_size=70),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    body = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        kind = draw(st.sampled_from(["replace", "replace", "delete", "extra", "name", "namespace", "label"]))
        if kind in ("name", "namespace", "label") and not isinstance(body.get("metadata"), dict):
            continue
        if kind == "name":
            body["metadata"]["name"] = draw(_names)
            continue
        if kind == "namespace":
            body["metadata"]["namespace"] = draw(_names)
            continue
        if kind == "label":
            body["metadata"]["labels"] = {draw(_names): draw(_names)}
            continue
        paths = [p for p in _paths(body) if p and p[0] in ("spec", "metadata")]
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if kind == "replace":
            parent[path[-1]] = draw(_hostile)
        elif kind == "delete":
            parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[draw(st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["__proto__", "$ref", "a" * 300])))] = draw(_hostile)
    return body


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def check(body: dict[str, Any]) -> bool:
    """The properties of the module doc for one manifest; returns whether it was valid."""
    job, problems = validate_manifest(body)
    review = admitting.review(copy.deepcopy(body))
    if job is None:
        assert problems, body
        for problem in problems:
            root = problem.path.split(".")[0].split("[")[0]
            top = {format_path((key,)) for key in body}  # an unknown top-level key names itself
            assert root in ROOTS or root in body or problem.path in top, problem
            assert problem.message and len(str(problem)) < 2000, str(problem)[:300]
        if any(p.path.startswith(("spec", "metadata")) for p in problems):
            # (unknown top-level keys never reach the webhook: the API server prunes them first)
            assert review, "the webhook admitted what validate refused"
        assert len(admitting.refusal(review)) <= 4096
        return False
    assert not problems and not review, (problems, review)
    assert _schema_accepts(body["spec"]), body["spec"]
    objects = building.plan(job)
    assert [o["kind"] for o in objects][-1] == "Job"
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return True


@pytest.mark.slow
@FUZZ
@given(manifests())
def test_mutated_manifests_are_refused_with_field_paths_or_build_valid_objects(body: dict[str, Any]) -> None:
    COUNTS["valid" if check(body) else "refused"] += 1


COUNTS = {"valid": 0, "refused": 0}


def teardown_module() -> None:
    if sum(COUNTS.values()):
        print(f"\nfuzzed manifests: {COUNTS['valid']} valid (objects built and checked), {COUNTS['refused']} refused")


@pytest.mark.parametrize("name", ["a" * 63, "a" * 253, "x" + "-y" * 120])
def test_names_at_the_limits_build_valid_objects(name: str) -> None:
    body = copy.deepcopy(BASES[0])
    body["metadata"]["name"] = name
    if len(name) <= 253:
        assert check(body), validate_manifest(body)[1]


@pytest.mark.parametrize("name", ["a" * 254, "$(id)", "../x", "A", "a_b", ""])
def test_bad_names_are_refused_at_metadata_name(name: str) -> None:
    body = copy.deepcopy(BASES[0])
    body["metadata"]["name"] = name
    assert not check(body)
    assert any(p.path.startswith("metadata.name") for p in validate_manifest(body)[1])


def test_a_huge_unknown_key_is_not_echoed_back_whole() -> None:
    """Found by the fuzzer: a 100 kB label key came back whole in the problem's path."""
    body = copy.deepcopy(BASES[0])
    body["metadata"]["labels"] = {"x" * 100_000: None}
    assert not check(body)
    (problem,) = validate_manifest(body)[1]
    assert problem.path.startswith("metadata.labels.xxx") and "(100000 characters)" in problem.path
    assert len(str(problem)) < 200


@pytest.mark.parametrize("stage", [False, True])
def test_a_boolean_zero_stage_is_refused_as_the_crd_refuses_it(stage: bool) -> None:
    """Found by the fuzzer: ``Literal[0, 1, 2, 3]`` took ``false``/``true`` (they equal 0 and 1), so
    ``kubetune validate`` passed a manifest that ``kubectl apply`` refuses."""
    body = copy.deepcopy(BASES[0])
    body["spec"]["deepspeed"] = {"zeroStage": stage}
    assert not _schema_accepts(body["spec"])
    assert not check(body)
    assert [p.path for p in validate_manifest(body)[1]] == ["spec.deepspeed.zeroStage"]
