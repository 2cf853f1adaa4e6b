"""Loading kopf into the operator process without the Kubernetes client libraries it probes for.

``kubetune operator`` (``kubetune/cli.py``) imports the operator through :func:`without_client_libraries`.
kopf imports the official ``kubernetes`` client (and ``kubernetes_asyncio``, ``pykube``) whenever
they are installed, only to recognise their model objects (``kopf._cogs.helpers.thirdparty``) and to
register its fallback login handlers (``SmartOperatorRegistry``); the operator passes dicts and logs
in itself (``kubeapi.login``), so both would only cost memory and start-up time — the ``kubernetes``
package with urllib3 and its thousand generated model modules is the largest import of the process.
While kopf is imported, those names are marked absent in ``sys.modules`` (Python then raises
ImportError for them, which kopf expects when a library is not installed); afterwards they are
importable again, for ``kubeapi``'s fallback login through the official client (exec plugins).
``running.operator_main`` registers the handlers in a plain ``kopf.OperatorRegistry`` for the same
reason. ``tests/operator/test_gateway.py`` runs the operator process and checks what it imported.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

#: The client libraries kopf probes for at import.
CLIENT_LIBRARIES = ("kubernetes", "kubernetes_asyncio", "pykube")


@contextlib.contextmanager
def without_client_libraries() -> Iterator[None]:
    """Within the block, importing one of :data:`CLIENT_LIBRARIES` fails as if it were not installed."""
    blocked = [name for name in CLIENT_LIBRARIES if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable" marker
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]
