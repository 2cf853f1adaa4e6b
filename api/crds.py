"""Generating the FineTuneJob CustomResourceDefinition from the spec and status models.

``kubetune crd`` prints it; ``crds/finetunejobs.kubetune.io.yaml`` is its committed output and a
test fails when the two drift. The pydantic JSON schema is rewritten into a Kubernetes
*structural* schema (refs inlined, ``nullable`` instead of ``anyOf null``, OpenAPI v3.0 exclusive
bounds, no ``additionalProperties: false`` — the API server's strict field validation rejects
unknown fields instead), with the descriptions kept so ``kubectl explain`` is useful, and CEL rules
that make the training-defining fields immutable after creation.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune.api.jobs import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from kubetune.api.specs import FineTuneJobSpec
from kubetune.api.statuses import FineTuneJobStatus

#: Spec blocks that define the training: immutable once created. runPolicy stays mutable.
IMMUTABLE_SPEC_FIELDS = (
    "model",
    "data",
    "peft",
    "techniques",
    "training",
    "deepspeed",
    "resources",
    "checkpointing",
    "output",
    "s3",
)
MUTABLE_SPEC_FIELDS = ("runPolicy",)

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Techniques", "type": "string", "jsonPath": ".status.techniques", "description": "Techniques in use."},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "Percent of steps done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP_KEYS = {"title", "default", "examples", "$defs", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every $ref (the models have no recursion)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].split("/")[-1]]
            merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: Any) -> Any:
    """Rewrite one JSON-schema node into a Kubernetes structural-schema node."""
    if isinstance(node, list):
        return [_structural(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    description = node.get("description")
    if "anyOf" in node:
        every = node.pop("anyOf")
        options = [o for o in every if o.get("type") != "null"]
        nullable = len(options) < len(every)
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types structurally: {options}")
        inner = dict(options[0])
        node = {**inner, **node}
        if nullable and "enum" in node:
            # The API server checks an enum on null as well and refuses it, listed or not. Left
            # not nullable, a null is dropped before validation instead: the same as leaving the
            # field out, which is what None means here. A null distinct from "absent" cannot be had.
            if node.get("default") is not None:
                raise ValueError(f"a nullable enum with default {node['default']!r} cannot be expressed: {node}")
        elif nullable:
            node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = node[key]
            node[key] = True
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {k: _structural(v) for k, v in value.items()}
        elif key in {"items"}:
            out[key] = _structural(value)
        elif key == "additionalProperties":
            if isinstance(value, dict) and not preserve:
                out[key] = _structural(value)
            # `false` is left to strict field validation; `true` becomes preserve-unknown-fields
        else:
            out[key] = value
    if preserve:
        out = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        if description:
            out["description"] = description
        if node.get("nullable"):
            out["nullable"] = True
    if "type" not in out and "enum" in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"] if v is not None) else "integer"
    return out


def model_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, descriptions included."""
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _structural(_resolve(raw, defs))
    return schema


def _immutability_rules() -> list[dict[str, str]]:
    rules = []
    required = {name for name, f in FineTuneJobSpec.model_fields.items() if f.is_required()}
    for field in IMMUTABLE_SPEC_FIELDS:
        python_name = next(n for n, f in FineTuneJobSpec.model_fields.items() if (f.alias or n) == field)
        if python_name in required:
            rule = f"self.{field} == oldSelf.{field}"
        else:
            rule = f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
        rules.append(
            {
                "rule": rule,
                "message": f"spec.{field} is immutable: it defines the training. Create a new FineTuneJob "
                "(only spec.runPolicy may change)",
                "reason": "FieldValueForbidden",
                "fieldPath": f".{field}",
            }
        )
    return rules


def spec_schema() -> dict[str, Any]:
    schema = model_schema(FineTuneJobSpec)
    schema["x-kubernetes-validations"] = _immutability_rules()
    return schema


def status_schema() -> dict[str, Any]:
    schema = model_schema(FineTuneJobStatus)
    schema.pop("required", None)
    return schema


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest for FineTuneJob."""
    spec = spec_schema()
    spec["description"] = (
        "What to fine-tune, on which data, with which techniques and where. Everything except runPolicy "
        "is immutable once created."
    )
    status = status_schema()
    status["description"] = "Observed state: phase, conditions, progress and checkpoints."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "A FineTuneJob fine-tunes a language model with DeepSpeed trainer pods.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
                                "kind": {"type": "string", "description": "FineTuneJob"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML committed in crds/."""
    header = "# Generated by `kubetune crd` from kubetune.api; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)
