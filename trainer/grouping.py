"""Splitting the optimizer's parameter groups by a property of each parameter's name.

Techniques that give some parameters their own learning rate or weight decay (transfer learning:
head vs base; layer selection: per-pattern learning rates; regularisation: decay vs no decay) get
the current groups in their ``param_groups`` hook and return them split: :func:`split_groups`
does the splitting once, for all of them, so each says only how a name is classified and what
each class changes. Groups are dicts as ``torch.optim`` takes them, with ``param_names`` beside
``params`` (filled from the model when a group lacks them) and a ``name`` shown in logs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

Part = TypeVar("Part", bound=Hashable)


def split_groups(model: Any, groups: list[dict[str, Any]], part_of: Callable[[str], Part], parts: Iterable[Part],
                 settings: Callable[[dict[str, Any], Part], dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split into one group per part (``part_of(name)`` for each parameter), in the
    order of ``parts``, empty ones left out. A new group is the old one updated with its params,
    their names and ``settings(old_group, part)`` (``lr``, ``weight_decay``, ``name``…)."""
    names_of = {id(p): n for n, p in model.named_parameters()}
    order = list(parts)
    out: list[dict[str, Any]] = []
    for group in groups:
        names = group.get("param_names") or [names_of[id(p)] for p in group["params"]]
        members: dict[Part, list[tuple[str, Any]]] = {part: [] for part in order}
        for name, param in zip(names, group["params"]):
            members[part_of(name)].append((name, param))
        for part in order:
            if members[part]:
                out.append({
                    **group,
                    "params": [p for _, p in members[part]],
                    "param_names": [n for n, _ in members[part]],
                    **settings(group, part),
                })
    return out
