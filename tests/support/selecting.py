"""
Label and field selectors of the Kubernetes list/watch API, parsed and matched against dicts.

The API server emulator (``tests.support.emulating``) filters ``?labelSelector=`` and
``?fieldSelector=`` with these. Label selectors follow the real grammar: ``a=b``, ``a==b``,
``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``, comma-joined (AND). Field selectors
accept ``=``, ``==`` and ``!=`` on any dotted path (``metadata.name``, ``status.phase``); the real
server allows only a few fields per kind and answers 400 for others, this one allows all.
A malformed selector raises :class:`SelectorError`, which the emulator answers with 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]


class SelectorError(ValueError):
    """A selector the real API server would refuse with 400 Bad Request."""


_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*$")


def _split_requirements(selector: str) -> list[str]:
    """Split on commas that are not inside ``( … )`` value sets."""
    parts, depth, current = [], 0, []
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def parse_label_selector(selector: str | None) -> Predicate:
    """Return a predicate over an object's ``metadata.labels``; empty selects everything."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for requirement in _split_requirements(selector or ""):
        if match := _SET_RE.match(requirement):
            negated, key, operator, raw_values = match.groups()
            if negated:
                raise SelectorError(f"unable to parse requirement: {requirement!r}")
            values = {v.strip() for v in raw_values.split(",") if v.strip()}
            if operator == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := _EQ_RE.match(requirement):
            key, operator, value = match.groups()
            if operator == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := _EXISTS_RE.match(requirement):
            negated, key = match.groups()
            if negated:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise SelectorError(f"unable to parse requirement: {requirement!r}")

    def predicate(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def parse_field_selector(selector: str | None) -> Predicate:
    """Return a predicate over dotted field paths; empty selects everything."""
    checks: list[Predicate] = []
    for requirement in _split_requirements(selector or ""):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", requirement)
        if not match:
            raise SelectorError(f"invalid field selector requirement: {requirement!r}")
        path, operator, value = match.groups()
        if operator == "!=":
            checks.append(lambda obj, p=path, v=value: _field(obj, p) != v)
        else:
            checks.append(lambda obj, p=path, v=value: _field(obj, p) == v)
    return lambda obj: all(check(obj) for check in checks)


def _field(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
