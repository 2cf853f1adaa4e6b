"""The CRD schema and the pydantic models accept and reject the same specs.

Manifests are generated with hypothesis from the CRD's own schema (so most are valid), then
mutated (a value replaced by one of another type or out of range, an unknown key added). Each one
is judged by jsonschema on the CRD schema and by the pydantic models; the verdicts must agree.
Cross-field rules are CEL/operator territory and are left out on both sides (``skip_rules``).

The jsonschema side follows the API server's semantics: unknown fields are rejected (kubectl's
default strict field validation), ``nullable`` admits null, and patterns are anchored like RE2,
where ``$`` matches only at the very end (Python's ``re`` would also match before a final newline).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune.api.crds import spec_schema
from kubetune.api.specs import FineTuneJobSpec


def _as_jsonschema(node: Any) -> Any:
    if isinstance(node, list):
        return [_as_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes") and k not in {"nullable", "properties"}}
    if "properties" in node:
        out["properties"] = {k: _as_jsonschema(v) for k, v in node["properties"].items()}
    if isinstance(out.get("pattern"), str):
        out["pattern"] = out["pattern"].replace("$", r"\Z")
    if "properties" in out:
        out["additionalProperties"] = False
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]  # an enum is checked on null as well, as the API server does
    return out


SCHEMA = _as_jsonschema(spec_schema())
VALIDATOR = jsonschema.Draft4Validator(SCHEMA)


def server_decoded(value: Any, node: Any = None) -> Any:
    """``value`` as the API server validates and stores it: a null in a field whose schema is not
    ``nullable`` is dropped first (the same as leaving the field out), and an integral float is an
    integer (``0.0`` for an integer field is stored as ``0``), at any depth. The models are stricter
    on the raw manifest (``kubetune validate`` refuses both), never on what the server stores."""
    node = spec_schema() if node is None else node
    if not isinstance(node, dict):
        return value
    if isinstance(value, float) and node.get("type") == "integer" and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [server_decoded(item, node.get("items")) for item in value]
    if not isinstance(value, dict) or node.get("x-kubernetes-preserve-unknown-fields"):
        return value
    properties, additional = node.get("properties") or {}, node.get("additionalProperties")
    out = {}
    for key, item in value.items():
        child = properties.get(key, additional if isinstance(additional, dict) else None)
        if item is None and isinstance(child, dict) and not child.get("nullable"):
            continue
        out[key] = server_decoded(item, child)
    return out


def _schema_accepts(spec: Any) -> bool:
    return VALIDATOR.is_valid(spec)


def _models_accept(spec: Any) -> bool:
    try:
        FineTuneJobSpec.model_validate(spec, context={"skip_rules": True})
    except ValidationError:
        return False
    return True


def from_schema(node: dict) -> st.SearchStrategy[Any]:
    """Values valid for a structural-schema node (our own generator: small and exact)."""
    if node.get("type") == ["string", "null"] or isinstance(node.get("type"), list):
        inner = {**node, "type": node["type"][0]}
        if "enum" in inner:
            inner["enum"] = [v for v in inner["enum"] if v is not None]
        return st.one_of(st.none(), from_schema(inner))
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties")
        if props is None:
            extra = node.get("additionalProperties")
            values = from_schema(extra) if isinstance(extra, dict) else st.one_of(st.integers(), st.text(max_size=5))
            return st.dictionaries(st.text(min_size=1, max_size=8), values, max_size=3)
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(from_schema(node["items"]), min_size=node.get("minItems", 0), max_size=min(node.get("maxItems", 3), 3))
    if kind == "string":
        low, high = node.get("minLength", 0), node.get("maxLength", 40)
        if "pattern" in node:
            return st.from_regex(node["pattern"].replace(r"\Z", "$"), fullmatch=True).filter(lambda s: low <= len(s) <= high)
        return st.text(min_size=low, max_size=min(high, 40))
    if kind == "boolean":
        return st.booleans()
    if kind in {"integer", "number"}:
        lo, hi = node.get("minimum"), node.get("maximum")
        if kind == "integer":
            return st.integers(min_value=lo, max_value=hi)
        return st.floats(
            min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False,
            exclude_min=bool(node.get("exclusiveMinimum")), exclude_max=bool(node.get("exclusiveMaximum")),
        )
    raise AssertionError(f"no generator for {node}")


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.sampled_from(["", "lora", "cpu", "hf://org/x", "4Gi", "-1", "min", "linear", "1:3"]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3), st.dictionaries(st.text(max_size=6), _scalars, max_size=2))


@st.composite
def _mutated(draw: st.DrawFn) -> Any:
    spec = copy.deepcopy(draw(from_schema(SCHEMA)))
    paths = [p for p in _paths(spec) if p]
    kind = draw(st.sampled_from(["replace", "unknown-key", "replace", "none"]))
    if not paths or kind == "none":
        return spec
    path = draw(st.sampled_from(paths))
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    if kind == "replace":
        parent[path[-1]] = draw(_values)
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(_values)
    return spec


COMMON = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.slow
@COMMON
@given(from_schema(SCHEMA))
def test_specs_the_crd_accepts_the_models_accept(spec: Any) -> None:
    spec = server_decoded(spec)
    assert _schema_accepts(spec)
    assert _models_accept(spec), spec


@pytest.mark.slow
@COMMON
@given(_mutated())
def test_crd_and_models_agree_on_mutated_specs(spec: Any) -> None:
    spec = server_decoded(spec)
    assert _schema_accepts(spec) == _models_accept(spec), spec


@pytest.mark.parametrize(
    "spec",
    [
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}},
        {"model": {"source": "hf://o/m\n"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}},
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}, "peft": {"r": 1.0}},
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}, "training": {"learningRate": 1}},
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}, "training": {"maxSteps": True}},
        {"model": {"source": "hf://o/m", "revision": None}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}},
        {"model": {"source": "hf://o/m", "head": None}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}},
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}, "techniques": {"layerSelection": {"layers": ["-\U0001e951\u0de6"]}}},
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}, "resources": {"image": "repo/img\u00a0:1"}},
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}, "deepspeed": {"config": {"any": {"thing": [1]}}}},
        {"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}, "techniques": {"continualLearning": {"ewc": {"lambda": 5.0}}}},
    ],
)
def test_known_edge_cases_agree(spec: dict) -> None:
    spec = server_decoded(spec)
    assert _schema_accepts(spec) == _models_accept(spec)


def test_a_null_enum_is_dropped_as_the_server_does() -> None:
    spec = {"model": {"source": "hf://o/m", "head": None, "revision": None}, "data": {"datasets": [{"source": "x.jsonl", "format": "text"}]}}
    assert server_decoded(spec)["model"] == {"source": "hf://o/m", "revision": None}
    assert server_decoded({"runPolicy": {"ttlSecondsAfterFinished": 0.0, "backoffLimit": 1.5}})["runPolicy"] == {
        "ttlSecondsAfterFinished": 0, "backoffLimit": 1.5}


def test_pattern_anchor_rewrite_is_needed() -> None:
    """Python's `$` matches before a final newline; Kubernetes' RE2 does not."""
    assert re.search(r"^a$", "a\n") and not re.search(r"^a\Z", "a\n")
