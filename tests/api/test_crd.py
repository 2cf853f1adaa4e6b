"""The committed CRD is what `kubetune crd` generates, and it is a valid structural schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from kubetune.api import SHORT_NAMES
from kubetune.api.crds import IMMUTABLE_SPEC_FIELDS, build_crd, render_crd
from kubetune.api.specs import FineTuneJobSpec

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / "finetunejobs.kubetune.io.yaml"


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from _nodes(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _nodes(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def _schema() -> dict:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text() == render_crd(), "crds/ drifted: run `kubetune crd -o crds/finetunejobs.kubetune.io.yaml`"


def test_cli_prints_the_same_crd() -> None:
    out = subprocess.run([sys.executable, "-m", "kubetune", "crd"], capture_output=True, text=True, check=True).stdout
    assert out == render_crd()


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "definitions", "$defs", "const"):
            assert forbidden not in node, f"{path} uses {forbidden}"
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties false is not structural"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: properties and additionalProperties"
        if node.get("type") == "object" and "properties" not in node:
            assert "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata", path


def test_no_enum_is_nullable() -> None:
    """The API server checks an enum on null too and refuses it (found on the real CRD server):
    `head: null`, which the models accept as "not set", was refused with 'Unsupported value: null'.
    An enum is left not nullable, so the server drops a null before validation, as "not set"."""
    from kubetune.api.specs import ModelSpec
    full = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    enums = [path for path, node in _nodes(full) if "enum" in node]
    assert ".spec.model.head" in enums and ".status.phase" in enums
    assert [path for path, node in _nodes(full) if "enum" in node and (node.get("nullable") or None in node["enum"])] == []
    assert ModelSpec.model_fields["head"].default is None


def test_patterns_mean_the_same_to_the_api_server_and_to_python() -> None:
    """The API server matches patterns with RE2, where \\d, \\s, \\w and \\b are ASCII only; in
    Python (and pydantic) they are Unicode: "-𞥑෦" matched the layers pattern for the models only
    (found on the real CRD server). Patterns spell their classes out instead."""
    full = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    patterns = {path: node["pattern"] for path, node in _nodes(full) if "pattern" in node}
    assert patterns, "the schema has patterns"
    assert {p: v for p, v in patterns.items() if any(c in v for c in ("\\d", "\\s", "\\w", "\\b", "\\D", "\\S", "\\W"))} == {}


def test_every_spec_field_is_described_for_kubectl_explain() -> None:
    spec = _schema()["properties"]["spec"]
    undocumented = [path for path, node in _nodes(spec, "spec") if path and not path.endswith("[]") and "{" not in path and not node.get("description")]
    assert undocumented == []


def test_strings_and_lists_in_spec_are_bounded_for_cel_cost() -> None:
    """CEL immutability rules compare whole blocks; unbounded strings/lists make their cost unbounded."""
    spec = _schema()["properties"]["spec"]
    unbounded = []
    for path, node in _nodes(spec, "spec"):
        if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
    # Strings inside free-form maps (nodeSelector values) are bounded by the map, which Kubernetes caps.
    assert [p for p in unbounded if "{" not in p] == []


def test_names_columns_and_subresource() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    names = crd["spec"]["names"]
    assert names["shortNames"] == list(SHORT_NAMES) == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Techniques", "Progress", "Loss", "Age"]


def test_training_fields_are_immutable_and_run_policy_is_not() -> None:
    rules = _schema()["properties"]["spec"]["x-kubernetes-validations"]
    covered = {r["fieldPath"].lstrip(".") for r in rules}
    assert covered == set(IMMUTABLE_SPEC_FIELDS)
    assert "runPolicy" not in covered
    aliases = {f.alias or n for n, f in FineTuneJobSpec.model_fields.items()}
    assert set(IMMUTABLE_SPEC_FIELDS) | {"runPolicy"} == aliases, "every spec block must be classified"
    for rule in rules:
        assert "oldSelf" in rule["rule"] and rule["message"].startswith(f"spec.{rule['fieldPath'].lstrip('.')} is immutable")


def test_committed_crd_is_yaml_with_header() -> None:
    text = COMMITTED.read_text()
    assert text.startswith("# Generated by `kubetune crd`")
    assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"
