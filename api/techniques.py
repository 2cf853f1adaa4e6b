"""``spec.techniques``: the block of every technique, built from the technique registry.

Each technique declares its own block, number and title in its folder (``kubetune.techniques``);
this module assembles them into one model, :data:`TechniquesSpec`, with one optional field per
technique in registry order, described as ``"<number> · <title>."`` — so the CRD, ``kubectl
explain``, the validation and the docs follow the registry with nothing written here per technique.
``TECHNIQUES`` is the same registry keyed by YAML name, for callers of ``kubetune.api``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pydantic import Field, create_model

from kubetune.api.base import SpecModel
from kubetune.techniques import registered
from kubetune.techniques.declarations import Declaration


class TechniquesBlock(SpecModel):
    """The fine-tuning techniques; each set block turns one on, and they combine."""

    def enabled(self) -> list[str]:
        """Names (YAML keys) of the techniques this job turns on, in registry order."""
        return [d.key for d in registered().values() if getattr(self, d.attribute) is not None]

    def config(self, key: str) -> Any:
        """The block of the technique named ``key`` (its YAML name), or None when it is off."""
        return getattr(self, registered()[key].attribute)

    if TYPE_CHECKING:  # the fields are made from the registry at import time

        def __getattr__(self, attribute: str) -> Any: ...


def _build() -> type[TechniquesBlock]:
    fields: dict[str, Any] = {
        d.attribute: (d.spec | None, Field(default=None, description=d.description)) for d in registered().values()
    }
    model = create_model("TechniquesSpec", __base__=TechniquesBlock, __module__=__name__, **fields)
    model.__doc__ = TechniquesBlock.__doc__
    for d in registered().values():
        alias = model.model_fields[d.attribute].alias
        if alias != d.key:
            raise ValueError(f"technique key {d.key!r} is not the camelCase of its attribute {d.attribute!r} ({alias!r})")
    return model


#: The ``spec.techniques`` model: one optional block per registered technique (to type checkers,
#: a TechniquesBlock whose technique attributes are Any).
if TYPE_CHECKING:
    TechniquesSpec = TechniquesBlock
else:
    TechniquesSpec = _build()

#: Every technique by YAML key, in registry order (the registry itself).
TECHNIQUES: dict[str, Declaration] = registered()

#: What the API knows of a technique (the declaration, under its former name).
TechniqueInfo = Declaration


def __getattr__(name: str) -> Any:
    # The technique blocks' models live in their folders; code that imported one from here
    # (``HyperparameterSearchSpec``…) still finds it, by class name.
    for d in TECHNIQUES.values():
        found = getattr(importlib.import_module(d.spec.__module__), name, None)
        if isinstance(found, type) and issubclass(found, SpecModel):
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
