"""Prometheus metrics of the operator: FineTuneJobs by phase, reconcile latency and errors, API errors.

The kopf handlers call :func:`observe_reconcile` around each reconcile, the API gateway
(``kubetune.operator.kubeapi``) calls :func:`count_api_error` for every failed request, and a
periodic task calls :func:`set_jobs_by_phase` with the phase counts it sees. ``kubetune operator
--metrics-port`` calls :func:`start_metrics_server`; the chart's metrics Service (and optional
ServiceMonitor) scrapes it at ``/metrics``.

The metrics live in one module-level :class:`~prometheus_client.CollectorRegistry` (``REGISTRY``),
not prometheus_client's global default, so importing this module twice in tests never trips a
"duplicated timeseries" error and nothing else in the process leaks into the scrape; the process
and platform collectors are added to it on purpose (memory, CPU, open files of the operator pod).
Metric names are part of the chart's documented interface (docs/operations.md) — renaming one
breaks users' dashboards and alerts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from kubetune.api import PHASES

__all__ = [
    "API_ERRORS",
    "JOBS_BY_PHASE",
    "RECONCILE_ERRORS",
    "RECONCILE_SECONDS",
    "REGISTRY",
    "count_api_error",
    "observe_reconcile",
    "set_jobs_by_phase",
    "start_metrics_server",
]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: Reconciles take milliseconds (a status patch) to tens of seconds (first create under API load).
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

JOBS_BY_PHASE = Gauge(
    "kubetune_finetunejobs",
    "FineTuneJobs the operator watches, by status.phase (Unknown: no phase yet or one not in the API).",
    ["phase"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time spent in one reconcile of an object, by the kind of object reconciled.",
    ["kind"],
    buckets=_RECONCILE_BUCKETS,
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "kubetune_reconcile_errors",
    "Reconciles that ended in an error (kopf retries them), by kind.",
    ["kind"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "kubetune_api_errors",
    "Kubernetes API requests of the operator that failed, by verb, resource and HTTP status (0: no response).",
    ["verb", "resource", "status"],
    registry=REGISTRY,
)

_KNOWN_PHASES = (*PHASES, "Unknown")
for _phase in _KNOWN_PHASES:
    JOBS_BY_PHASE.labels(phase=_phase).set(0)


def observe_reconcile(kind: str, seconds: float, error: bool) -> None:
    """Record one reconcile of an object of ``kind`` (e.g. ``FineTuneJob``, ``Job``)."""
    if seconds < 0:
        raise ValueError(f"observe_reconcile: seconds must be >= 0, got {seconds}")
    RECONCILE_SECONDS.labels(kind=kind).observe(seconds)
    if error:
        RECONCILE_ERRORS.labels(kind=kind).inc()
    else:
        # Touch the child so the series exists (at 0) before the first error: alerts on rate() need it.
        RECONCILE_ERRORS.labels(kind=kind)


def count_api_error(verb: str, resource: str, status: int) -> None:
    """Count one failed API request, e.g. ``("create", "jobs", 409)``; 0 when there was no response."""
    API_ERRORS.labels(verb=verb.lower(), resource=resource, status=str(int(status))).inc()


def set_jobs_by_phase(counts: Mapping[str, int]) -> None:
    """Replace the per-phase gauge with ``counts``; phases missing from it drop to 0.

    Unknown phase names (an empty string, a typo written by hand into status) are summed under
    ``Unknown`` so the label set stays bounded.
    """
    totals = dict.fromkeys(_KNOWN_PHASES, 0)
    for phase, count in counts.items():
        if count < 0:
            raise ValueError(f"set_jobs_by_phase: count of {phase!r} must be >= 0, got {count}")
        totals[phase if phase in totals else "Unknown"] += int(count)
    for phase, count in totals.items():
        JOBS_BY_PHASE.labels(phase=phase).set(count)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; port 0 picks a free port.

    Returns the server (``server.server_port`` is the bound port; ``server.shutdown()`` stops it)
    and its thread.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics-port: must be in 0..65535, got {port}")
    return start_http_server(port, addr=addr, registry=REGISTRY)
