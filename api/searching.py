"""Search-space paths: which spec fields a hyperparameter search may tune, and how a trial's
values are written into a copy of the spec.

A path is dotted camelCase under ``spec`` (``training.learningRate``, ``peft.r``). It must name a
scalar field; the trial's spec is re-validated, so a value out of a field's bounds is caught.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, get_args, get_origin

from pydantic import BaseModel


def _unwrap(annotation: Any) -> Any:
    """X | None -> X."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and len(args) == 1 and str(get_origin(annotation)) in {"typing.Union", "<class 'types.UnionType'>"}:
        return args[0]
    return annotation


def _field_by_alias(model: type[BaseModel], key: str) -> tuple[str, Any] | None:
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return name, info
    return None


def resolve_search_path(path: str) -> str | None:
    """None when ``path`` names a tunable scalar field of the spec, else what is wrong."""
    from kubetune.api.specs import FineTuneJobSpec

    model: Any = FineTuneJobSpec
    parts = path.split(".")
    for i, key in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"{'.'.join(parts[:i])} is not a block with fields"
        found = _field_by_alias(model, key)
        if found is None:
            names = [info.alias or n for n, info in model.model_fields.items()]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; fields here: {', '.join(names)}"
            return f"no field {key!r} in {'.'.join(parts[:i]) or 'spec'}{hint}"
        model = _unwrap(found[1].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return f"{path} is a block; name one of its scalar fields"
    if path.split(".")[0] in {"model", "data", "resources", "checkpointing", "output", "runPolicy"}:
        return f"{path} is not a training hyperparameter; tune training, peft, deepspeed or techniques fields"
    return None


def apply_trial(spec: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a spec manifest with each dotted path set to its trial value."""
    out = copy.deepcopy(spec)
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out
