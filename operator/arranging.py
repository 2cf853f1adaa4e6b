"""Techniques that arrange runs instead of changing one: which operator hook a FineTuneJob needs.

A technique declaring ``Capability.ARRANGES_RUNS`` names an operator hook module in its
declaration (``Declaration.operator``, a :class:`~kubetune.techniques.declarations.RunArranger`):
hyperparameter search makes trials, child FineTuneJobs, instead of trainer pods. The kopf handlers
(``kubetune.operator.handlers``) ask this module, so they name no technique: a FineTuneJob that
turns such a technique on is handed to its hook, and every event of a run it made (labelled with
the hook's ``CHILD_LABEL``) goes back to the hook.
"""

from __future__ import annotations

import importlib
from typing import Any, cast

from kubetune.techniques import registered
from kubetune.techniques.declarations import RunArranger


def arrangers() -> dict[str, RunArranger]:
    """The operator hook of every technique that has one, by technique key, in registry order."""
    return {d.key: cast(RunArranger, importlib.import_module(d.operator)) for d in registered().values() if d.operator}


def arranger_for(body: dict[str, Any]) -> RunArranger | None:
    """The hook that arranges this FineTuneJob's runs, or None for a job that trains itself.

    Read from the raw body, as the handlers get it (the spec may still be invalid).
    """
    techniques = (body.get("spec") or {}).get("techniques") or {}
    if not isinstance(techniques, dict):
        return None
    for key, hook in arrangers().items():
        if techniques.get(key) is not None:
            return hook
    return None
