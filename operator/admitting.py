"""Admission review of FineTuneJobs: what the validating webhook answers at ``kubectl apply``.

The ``@kopf.on.validate`` handler in ``kubetune.operator.handlers`` (served by kopf's webhook
server when ``KUBETUNE_WEBHOOK_PORT`` is set) calls :func:`review` and refuses the object with
every problem found, each with its field path. The CRD's schema and CEL rules catch what they can
before this runs; the webhook adds what only the models know: the full pydantic validation with
the cross-field rules (``kubetune.api.rules``) and, on UPDATE, the immutable fields — only
``spec.runPolicy`` (and metadata) may change on a live job, as the CRD's transition rules
``self.<field> == oldSelf.<field>`` also say. Pure: no API calls, so it answers within the API
server's webhook timeout.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import SpecError, parse_spec, validate_manifest
from kubetune.api.crds import IMMUTABLE_SPEC_FIELDS
from kubetune.api.problems import Problem


def _manifest(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of an admitted object the models judge (server-set metadata and status dropped)."""
    meta = body.get("metadata")
    meta = meta if isinstance(meta, dict) else {}  # validate_manifest names the bad metadata itself
    kept = {k: meta[k] for k in ("name", "namespace", "labels", "uid", "generation") if meta.get(k) is not None}
    if "name" not in kept and meta.get("generateName"):
        kept["name"] = str(meta["generateName"]).rstrip("-.") or "job"
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept, "spec": body.get("spec")}


def _normalised(spec: Any) -> dict[str, Any] | None:
    try:
        return parse_spec(spec).to_manifest()
    except SpecError:
        return None


def immutable_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Problem]:
    """A problem for each training-defining block that differs between ``old`` and ``new``."""
    before = _normalised(old.get("spec")) or (old.get("spec") or {})
    after = _normalised(new.get("spec")) or (new.get("spec") or {})
    return [Problem(f"spec.{field}", "cannot change after creation: it defines the training (only spec.runPolicy "
                    "may change); create a new FineTuneJob instead")
            for field in IMMUTABLE_SPEC_FIELDS if before.get(field) != after.get(field)]


def review(body: dict[str, Any], old: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem of ``body`` (the object being created or updated to), with field paths."""
    _, problems = validate_manifest(_manifest(body))
    if old is not None and (old.get("spec") or None) is not None:
        problems = list(problems) + immutable_changes(old, body)
    return list(problems)


def refusal(problems: list[Problem]) -> str:
    """The message the API server shows to ``kubectl apply`` (bounded, every problem listed)."""
    text = "invalid FineTuneJob: " + "; ".join(str(p) for p in problems)
    return text if len(text) <= 4096 else text[:4095] + "…"
