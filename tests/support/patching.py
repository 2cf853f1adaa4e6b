"""
Applying the patch formats of the Kubernetes API to plain dicts, for the API server emulator.

The emulator (``tests.support.emulating``) calls :func:`apply_patch` for every PATCH request,
choosing the algorithm by the request's Content-Type the way the real API server does:

* ``application/merge-patch+json`` — RFC 7386 JSON merge patch (kopf, CustomObjectsApi);
* ``application/json-patch+json`` — RFC 6902 JSON patch, including ``test`` ops (kopf uses
  ``test /metadata/resourceVersion`` for optimistic concurrency and expects 422 on a mismatch);
* ``application/strategic-merge-patch+json`` — the built-in types' strategic merge patch, which
  the ``kubernetes`` client sends for dict bodies of core/batch/rbac patches. This is an
  approximation: lists named in :data:`MERGE_KEYS` merge by their key, ``finalizers`` merges as a
  set, ``$patch: delete``/``$patch: replace`` and ``$deleteFromPrimitiveList/…`` are honoured,
  other lists are replaced. The real server takes merge keys from the Go types, so a list not in
  the table merges there but is replaced here.

A failure raises :class:`PatchError` with the HTTP status the real server would answer with.
"""

from __future__ import annotations

import copy
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# Strategic-merge keys of the lists our manifests use (from the Go types' patchMergeKey tags).
# A list field appears under one name with different keys only for `ports`, resolved by content.
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "hostAliases": ("ip",),
    "resourceClaims": ("name",),
    "ports": ("containerPort", "port"),
}
# Primitive lists with patchStrategy=merge: merged as ordered sets.
SET_LISTS = frozenset({"finalizers"})


class PatchError(Exception):
    """A patch that the API server would refuse; ``status`` is the HTTP code it would answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    """Return a patched deep copy of ``target``; ``content_type`` selects the algorithm."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == MERGE_PATCH:
        if not isinstance(patch, dict):
            raise PatchError(400, "a merge patch must be a JSON object")
        return merge_patch(target, patch)
    if kind == JSON_PATCH:
        if not isinstance(patch, list):
            raise PatchError(400, "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        return json_patch(target, patch)
    if kind == STRATEGIC_MERGE_PATCH:
        if not isinstance(patch, dict):
            raise PatchError(400, "a strategic merge patch must be a JSON object")
        return strategic_merge_patch(target, patch)
    raise PatchError(415, f"the body of the request was in an unknown format: {content_type!r}")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` removes a key, anything else replaces. The target
    is deep-copied once (not again at every level of the patch: a Job's status patch copied the Job
    once per level)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    return _merge_into(copy.deepcopy(target) if isinstance(target, dict) else {}, patch)


def _merge_into(result: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Merge ``patch`` into ``result`` (already the caller's own copy) in place."""
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            current = result.get(key)
            result[key] = _merge_into(current if isinstance(current, dict) else {}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def json_patch(target: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    """RFC 6902 over a deep copy; any failed op (``test`` included) is a 422 like the real server."""
    doc: Any = copy.deepcopy(target)
    for index, op in enumerate(operations):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(400, f"json patch operation #{index} needs 'op' and 'path': {op!r}")
        name, path = op["op"], op["path"]
        try:
            if name == "test":
                if _json_get(doc, path) != op.get("value"):
                    raise PatchError(422, f"testing value {path} failed: {op.get('value')!r}")
            elif name == "add":
                doc = _json_put(doc, path, copy.deepcopy(op["value"]), insert=True)
            elif name == "replace":
                _json_get(doc, path)  # must exist
                doc = _json_put(doc, path, copy.deepcopy(op["value"]), insert=False)
            elif name == "remove":
                doc = _json_remove(doc, path)
            elif name in ("move", "copy"):
                value = _json_get(doc, op["from"])
                if name == "move":
                    doc = _json_remove(doc, op["from"])
                doc = _json_put(doc, path, copy.deepcopy(value), insert=True)
            else:
                raise PatchError(400, f"unknown json patch operation {name!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise PatchError(422, f"json patch op #{index} ({name} {path}) failed: {exc!r}") from exc
    return doc


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"a JSON pointer starts with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_get(doc: Any, path: str) -> Any:
    for part in _pointer(path):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _json_put(doc: Any, path: str, value: Any, *, insert: bool) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _json_get(doc, "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts[:-1])) \
        if len(parts) > 1 else doc
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif insert:
            position = int(last)
            if not 0 <= position <= len(parent):
                raise IndexError(f"index {position} out of range")
            parent.insert(position, value)
        else:
            parent[int(last)] = value
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise TypeError(f"cannot set {last!r} inside a {type(parent).__name__}")
    return doc


def _json_remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise ValueError("cannot remove the whole document")
    parent = _json_get(doc, "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts[:-1])) \
        if len(parts) > 1 else doc
    if isinstance(parent, list):
        del parent[int(parts[-1])]
    else:
        del parent[parts[-1]]
    return doc


def strategic_merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """An approximation of strategic merge patch (see the module docstring for its limits)."""
    return _smp_dict(copy.deepcopy(target), patch)


def _smp_dict(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(target.get(field), list):
                target[field] = [item for item in target[field] if item not in value]
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            current = target.get(key)
            target[key] = _smp_dict(current if isinstance(current, dict) else {}, value)
        elif isinstance(value, list):
            target[key] = _smp_list(key, target.get(key), value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _smp_list(field: str, current: Any, patch: list[Any]) -> list[Any]:
    current = current if isinstance(current, list) else []
    if field in SET_LISTS:
        merged = list(current)
        for item in patch:
            if item not in merged:
                merged.append(copy.deepcopy(item))
        return merged
    keys = MERGE_KEYS.get(field)
    if not keys or not all(isinstance(item, dict) for item in patch + current):
        return copy.deepcopy(patch)
    key = next((k for k in keys if any(k in item for item in patch + current)), keys[0])
    merged = [copy.deepcopy(item) for item in current]
    for item in patch:
        position = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if position is not None:
                del merged[position]
        elif position is None:
            merged.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
        else:
            merged[position] = _smp_dict(merged[position], item)
    return merged
