"""Three changes to kopf's watch streams, before kopf turns an event into causes and handler calls.

``running.configure`` (the operator's startup handler) calls :func:`install` with
``handlers.absorb_own_write`` and ``handlers.queue_child_event``. The hooks go into private kopf
modules, which kopf's public API has no setting for; each checks first that kopf is shaped as this
was written for (kopf 1.45) and otherwise leaves kopf as it is, with a warning: the operator then
works as before, only dearer (every event through kopf's handlers).
``tests/operator/test_watching.py`` fails when a hook no longer installs on the kopf in use.

* **Decoding**: kopf decodes each line of a watch stream with ``json.loads`` in
  ``kopf._cogs.clients.api.stream``; its module's ``json`` is replaced by one whose ``loads`` is
  ``decoding.loads`` (orjson; the standard library for what orjson refuses). ~14 events per
  FineTuneJob lifecycle, the Job and pod bodies ~6 KB each.
* **The operator's own status writes coming back**: every status patch the operator makes comes
  back as a MODIFIED event of its FineTuneJob (3 of the ~14 events of a lifecycle). kopf would run
  its whole per-event machinery for it (memory, loggers, diff base, causes, handler kwargs) to call
  ``count_phases``, which only notes the body. ``kopf._cogs.clients.watching.watch_objs`` is wrapped
  so that such an event, recognised by its resourceVersion being the one the write returned,
  is handed to ``absorb`` first: when ``absorb`` has done what the handlers would do with it and
  returns True, kopf gets a BOOKMARK of the same resourceVersion instead (kopf keeps the stream's
  position from it and processes nothing).
* **The children's events into a work queue**: the same wrapper offers every event of any type to
  ``take`` first (``handlers.queue_child_event``: a managed Job's or pod's event is noted in the
  store and its FineTuneJob queued for a status decision, ``queueing``), with the same BOOKMARK to
  kopf when it is taken (9 of the ~14 events of a lifecycle). A DELETED event is queued but not
  taken: it reaches kopf marked (``handlers.QUEUED``), so that kopf forgets the object and its
  handlers do nothing more. What neither takes goes to kopf unchanged, and so does everything of
  kopf's listings (they do not pass ``watch_objs``).
"""

from __future__ import annotations

import inspect
import json
import logging
import types
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from kubetune.operator import decoding

logger = logging.getLogger(__name__)

#: ``absorb(resource, raw_event)``: True when the event is fully dealt with and kopf need not see it.
Absorb = Callable[[Any, Mapping[str, Any]], bool]

#: ``take(resource, raw_event)``, offered every event (any type) before ``absorb``: True when taken.
Take = Callable[[Any, Mapping[str, Any]], bool]

_absorb: Absorb | None = None
_take: Take | None = None


class _FastJson(types.ModuleType):
    """The ``json`` module with ``decoding.loads`` as ``loads``; everything else is the standard library's."""

    def __init__(self) -> None:
        super().__init__("json")
        self.loads = decoding.loads

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)


def _api_module() -> Any:
    from kopf._cogs.clients import api

    return api


def _watching_module() -> Any:
    from kopf._cogs.clients import watching

    return watching


def install_decoding() -> bool:
    """Make kopf's watch streams decode with ``decoding.loads``; False (and kopf untouched) when kopf
    no longer decodes them with its module's ``json.loads``."""
    try:
        api = _api_module()
        source = inspect.getsource(api.stream)
    except (ImportError, AttributeError, OSError, TypeError):
        source, api = "", None
    current = getattr(api, "json", None)
    if isinstance(current, _FastJson):
        return True
    if current is not json or "json.loads(" not in source:
        logger.warning("kopf's watch streams are not decoded where kubetune expects (kopf._cogs.clients.api.stream); "
                       "they stay on kopf's own decoding")
        return False
    api.json = _FastJson()
    return True


def install_absorbing(absorb: Absorb) -> bool:
    """Wrap kopf's ``watch_objs`` so that ``absorb`` sees each MODIFIED event first (see the module
    docstring); False (and kopf untouched) when kopf's watching is not shaped as expected."""
    global _absorb
    if not _wrap("the operator's own status writes go through kopf's event processing"):
        return False
    _absorb = absorb
    return True


def install_taking(take: Take) -> bool:
    """The same wrapper, with ``take`` offered every event first; False (and kopf untouched, its
    handlers then process every event of the Jobs and pods) when kopf is not shaped as expected."""
    global _take
    if not _wrap("the events of the operator's Jobs and pods go through kopf's handlers"):
        return False
    _take = take
    return True


def _wrap(otherwise: str) -> bool:
    """Put the wrapper of ``watch_objs`` in place (once); False when kopf's watching is not shaped as expected."""
    watching: Any = None
    original: Any = None
    parameters: Mapping[str, Any] = {}
    caller = ""
    try:
        watching = _watching_module()
        original = watching.watch_objs
        parameters = inspect.signature(original).parameters
        caller = inspect.getsource(watching.continuous_watch)
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        pass
    if getattr(original, "_kubetune_absorbing", False):
        return True
    if (not inspect.isasyncgenfunction(original) or "resource" not in parameters
            or "watch_objs(" not in caller or "BOOKMARK" not in caller):
        logger.warning("kopf's watch streams are not where kubetune expects (kopf._cogs.clients.watching.watch_objs); "
                       "%s", otherwise)
        return False

    async def watch_objs(*args: Any, resource: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for raw_input in original(*args, resource=resource, **kwargs):
            absorb_now, take_now = _absorb, _take
            try:
                absorbed = ((take_now is not None and take_now(resource, raw_input))
                            or (absorb_now is not None and raw_input.get("type") == "MODIFIED"
                                and absorb_now(resource, raw_input)))
            except Exception:  # never lose the event or end kopf's watch: kopf processes it as always
                logger.exception("noting or queueing a watch event failed; kopf processes the event")
                absorbed = False
            if absorbed:
                body = raw_input.get("object") or {}
                version = (body.get("metadata") or {}).get("resourceVersion")
                yield {"type": "BOOKMARK", "object": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                                                      "metadata": {"resourceVersion": version}}}
            else:
                yield raw_input

    watch_objs._kubetune_absorbing = True  # type: ignore[attr-defined]
    watch_objs.__wrapped__ = original  # type: ignore[attr-defined]
    watching.watch_objs = watch_objs
    return True


def install(absorb: Absorb) -> dict[str, bool]:
    """Decoding and absorbing; which of them are in place (``install_taking`` adds the work queue's hook)."""
    return {"decoding": install_decoding(), "absorbing": install_absorbing(absorb)}
