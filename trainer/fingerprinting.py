"""Fingerprinting the training-relevant part of a spec, so that a rerun resumes only the same run.

Every checkpoint's ``trainer.json`` keeps the spec fields that shape training (model, data, PEFT,
techniques, training, DeepSpeed) as flat ``spec.<path>: value`` pairs, and the run's length
(``maxSteps``/``epochs``) apart. ``kubetune train`` (:mod:`kubetune.trainer.local`) compares them
with the manifest before it starts: an edited field refuses the resume with one line naming it
(``--restart`` starts over); a finished run of the same spec and length is not trained again.
Left out on purpose: ``resources`` and ``runPolicy`` (a run may resume on another number of GPUs
or nodes), ``checkpointing``, ``output`` and ``s3`` (where things go, how the store is reached), ``training.logEverySteps`` (only
what is shown), ``deepspeed.engine`` (which engine runs the same optimizer: one GPU picks the fused
engine, several DeepSpeed, and a run moved between them resumes), and the length (a run may be
extended; ``--max-steps`` does that).
"""

from __future__ import annotations

import json
from typing import Any

NOT_FINGERPRINTED = ("resources", "runPolicy", "checkpointing", "output", "s3", "deepspeed.engine",
                     "training.logEverySteps", "training.maxSteps", "training.epochs")
LENGTH = ("training.maxSteps", "training.epochs")


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True)


def _spec_fields(job: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    _flatten(job.spec.model_dump(mode="json", by_alias=True, exclude_none=True), "", out)
    return out


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def training_spec(job: Any) -> dict[str, str]:
    """The fingerprint: ``{"training.learningRate": "0.0001", ...}`` (values JSON-encoded)."""
    return {k: v for k, v in _spec_fields(job).items() if not _under(k, NOT_FINGERPRINTED)}


def run_length(job: Any) -> dict[str, str]:
    fields = _spec_fields(job)
    return {k: fields.get(k, "null") for k in LENGTH}


def changes(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """``spec.<path>: old -> new`` for every field that differs (absent reads as unset)."""
    return [f"spec.{key}: {saved.get(key, 'unset')} -> {current.get(key, 'unset')}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]

