"""The techniques of kubetune, one folder each, and the registry every layer reads.

``MODULES`` below is the registry: the fifteen technique packages in the brief's order. Each holds
a :class:`~kubetune.techniques.declarations.Declaration` (``DECLARATION`` in its ``__init__.py``,
torch-free) and, for the trainer, a ``training.py`` plugin. :func:`registered` loads them once
and refuses a key, attribute or number taken twice. The API builds ``spec.techniques`` and the
cross-field rules from it (``kubetune.api.techniques``, ``kubetune.api.rules``), so the CRD, the
validation, ``kubetune validate`` and the docs tables follow; the trainer loads the plugins it
names (``kubetune.trainer.techniques.base``) and the operator the hooks of techniques that arrange
runs (``kubetune.operator.handlers``). Adding a technique: a folder here and its line in
``MODULES``.

A technique kept outside this repository (a site's own, or a test's) is a package of the same
shape named in ``KUBETUNE_TECHNIQUES`` (comma-separated module names, appended to the registry):
every process that reads the spec must see the same list — the operator, the trainer image and
``kubetune crd`` (the CRD must carry the block) alike.

Why the loading is a function: the declarations import ``kubetune.api.base`` (their models are
spec blocks) while ``kubetune.api`` builds its techniques block from the declarations. Whichever
is imported first, ``kubetune.api`` finishes loading before any declaration module is used, and
the declarations are loaded exactly once, by the first call.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetune.techniques.declarations import Declaration

#: The registry: one package per technique, in the brief's order. Keep one per line.
MODULES: tuple[str, ...] = (
    "kubetune.techniques.domain_adaptation",
    "kubetune.techniques.task",
    "kubetune.techniques.transfer_learning",
    "kubetune.techniques.prompt_engineering",
    "kubetune.techniques.multi_task",
    "kubetune.techniques.distillation",
    "kubetune.techniques.adversarial",
    "kubetune.techniques.hyperparameter_search",
    "kubetune.techniques.controlled_generation",
    "kubetune.techniques.layer_selection",
    "kubetune.techniques.regularization",
    "kubetune.techniques.augmentation",
    "kubetune.techniques.early_stopping",
    "kubetune.techniques.continual_learning",
    "kubetune.techniques.curriculum",
)

#: Extra technique packages, comma-separated, appended to MODULES (see the module doc).
EXTRA_ENV = "KUBETUNE_TECHNIQUES"

_REGISTRY: dict[str, Declaration] = {}
_loaded = False


def register(declaration: Declaration) -> None:
    """Add a declaration; a key, attribute or number already taken is a programming error."""
    for other in _REGISTRY.values():
        if declaration.key == other.key or declaration.attribute == other.attribute or declaration.number == other.number:
            raise ValueError(
                f"technique {declaration.key!r} (#{declaration.number}) is registered twice "
                f"(clashes with {other.key!r}, #{other.number})"
            )
    _REGISTRY[declaration.key] = declaration


def module_names() -> list[str]:
    """The registry's modules, then those named in ``KUBETUNE_TECHNIQUES``."""
    extra = [m.strip() for m in os.environ.get(EXTRA_ENV, "").split(",") if m.strip()]
    return list(MODULES) + extra


def registered() -> dict[str, Declaration]:
    """Every technique by YAML key, in registry order (loaded on the first call)."""
    global _loaded
    if _loaded:
        return _REGISTRY
    from kubetune.techniques.declarations import Declaration

    for name in module_names():
        found = getattr(importlib.import_module(name), "DECLARATION", None)
        if not isinstance(found, Declaration):
            raise TypeError(f"technique module {name} has no DECLARATION (a kubetune.techniques.declarations.Declaration)")
        register(found)
    _loaded = True
    return _REGISTRY


def declaration(key: str) -> Declaration:
    """One technique by YAML key (KeyError when there is none)."""
    return registered()[key]


# Last, so that the functions above exist when kubetune.api, loading, calls back (see the module doc).
import kubetune.api  # noqa: E402,F401
