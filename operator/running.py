"""``kubetune operator``: run the operator with deliberate kopf settings.

:func:`operator_main` is the CLI entry (``kubetune/cli.py``): it reads :class:`Settings` from
``KUBETUNE_*`` variables and flags, starts the metrics endpoint, and runs kopf over
``kubetune.operator.handlers``. :func:`configure` is what the one ``@kopf.on.startup`` handler
calls, so the same kopf settings apply however the handlers are loaded (CLI, ``kopf run``, tests):

* finalizer ``kubetune.io/finalizer``; kopf's diff base is ``status.observedGeneration`` and its
  handler progress goes to ``kubetune.io/*`` annotations only while a handler is retried
  (``persistence``: no annotation write in a normal lifecycle);
* watch timeouts from the settings (the server closes a watch before the client gives up on it);
* standalone by default — one replica, no KopfPeering objects; a peering name turns peering on;
* the Job and pod watches label-selected on the server (``managed-by``: no other pod reaches the operator);
* resource scanning off: the resources served are known at startup (the CRD ships with the
  chart), which saves the cluster-wide list/watch of CRDs and namespaces;
* kopf's own Events only for warnings and errors (our Events say what happened to the job);
* kopf's watch streams decoded with orjson, the operator's own status writes coming back kept
  from kopf's event processing, and the events of its Jobs and pods taken into a work queue before
  kopf (``watching``, ``queueing``; the handlers pass what absorbs and takes them).
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import kopf

from kubetune.api import GROUP, PLURAL
from kubetune.operator import certificates, kubeapi, metrics, naming, persistence, watching
from kubetune.operator.settings import Settings

logger = logging.getLogger(__name__)

_phases: dict[str, str] = {}
_counts: Counter[str] = Counter()  # of _phases' values, kept as they change


def configure(settings: kopf.OperatorSettings, memo: Any, absorb: watching.Absorb | None = None,
              take: watching.Take | None = None) -> Settings:
    """Apply our choices to kopf's settings and the API gateway's timeout; returns the Settings in use."""
    ours: Settings = memo.get("settings") if hasattr(memo, "get") and memo.get("settings") else Settings.from_env()
    memo["settings"] = ours
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = persistence.RetriesOnlyProgress(prefix=GROUP)
    settings.persistence.diffbase_storage = persistence.GenerationDiffBase()
    settings.watching.server_timeout = ours.watch_server_timeout
    settings.watching.client_timeout = ours.watch_client_timeout
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = ours.request_timeout
    settings.peering.standalone = not ours.peering
    if ours.peering:
        settings.peering.name = ours.peering
        settings.peering.mandatory = True
    settings.scanning.disabled = True
    # Jobs and pods are watched server-side label-selected: only the operator's own reach it (the
    # handlers' ``labels=`` filters run in the operator, after every pod of the watched namespaces
    # has been sent, decoded and queued).
    for selector in (("batch", "v1", "jobs"), ("v1", "pods")):
        settings.watching.label_selectors[selector] = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}"
    settings.posting.level = logging.WARNING
    settings.batching.error_delays = (1, 2, 5, 10, 30, 60, 120)
    if ours.webhook_port:
        # kopf serves the admission handlers over TLS and keeps the ValidatingWebhookConfiguration
        # (with the caBundle of its certificate) in line with them.
        certfile, pkeyfile = ours.webhook_cert_file or None, ours.webhook_key_file or None
        if certfile is None:  # a plain cluster: our own self-signed certificate (``certificates``)
            made = certificates.self_signed(ours.webhook_host or None, Path(tempfile.mkdtemp(prefix="kubetune-webhook-")))
            certfile, pkeyfile = str(made[0]), str(made[1])
        settings.admission.server = kopf.WebhookServer(
            addr="0.0.0.0", port=ours.webhook_port, host=ours.webhook_host or None,
            certfile=certfile, pkeyfile=pkeyfile,
        )
        settings.admission.managed = f"{PLURAL}.{GROUP}"
    kubeapi.REQUEST_TIMEOUT = float(ours.request_timeout)  # the gateway logs in with kopf (handlers.login)
    if absorb is not None:
        watching.install(absorb)
    if take is not None:
        watching.install_taking(take)
    _phases.clear()
    _counts.clear()
    logger.info("kubetune operator configured: %s", ours)
    return ours


def track_phase(uid: str | None, phase: str | None, *, deleted: bool = False) -> None:
    """Keep the jobs-by-phase gauge current from FineTuneJob events; no phase yet counts as Unknown."""
    if uid is None:
        return
    before = _phases.get(uid)
    after = None if deleted else phase or "Unknown"
    if after is None:
        _phases.pop(uid, None)
    else:
        _phases[uid] = after
    if before == after and _counts:
        return  # most events: no phase change, nothing to count (was a count of every job per event)
    if before is not None:
        _counts[before] -= 1
    if after is not None:
        _counts[after] += 1
    metrics.set_jobs_by_phase(+_counts)


#: Thresholds of CPython's cyclic garbage collector in the operator process (the interpreter's
#: defaults: 700, 10, 10). See :func:`settle_heap`.
GC_THRESHOLDS = (10_000, 20, 10)


def settle_heap() -> None:
    """Keep the cyclic garbage collector's pauses short and few in a busy operator (issue 14).

    Measured (bench/README.md, "Completion latency and the garbage collector"): with CPython's
    defaults a full (generation 2) collection ran every ~60 FineTuneJob lifecycles, each one
    traversing every tracked object: the modules imported at start-up and the per-object state of
    kopf and of our store, so each pause grew with the number of jobs, and the operator's event
    handling stood still for its length while the Job controller went on completing Jobs. Two
    changes, both standard CPython tuning:

    * ``gc.freeze()`` after the imports: the start-up heap (~80k objects: kopf, aiohttp, pydantic,
      our modules; never garbage) moves to the permanent generation that no collection scans;
    * a young-generation threshold of 10,000 allocations instead of 700: the event bodies,
      coroutines and futures of a burst mostly die before they are examined twice, so far fewer
      of them are promoted to the old generation, whose growth is what triggers a full collection
      (CPython collects it when the objects promoted since the last full one exceed a quarter of
      the survivors). A young collection then scans more objects, which costs milliseconds.

    Garbage in reference cycles is still collected, by the same generations, only in fewer and
    smaller passes; objects made at start-up and dropped later are never freed by the collector
    (a frozen heap is not scanned), which for imported modules is what happens anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def operator_main(args: argparse.Namespace) -> int:
    """Run the operator until interrupted."""
    overrides: dict[str, Any] = {
        "trainer_image": getattr(args, "trainer_image", None),
        "log_level": getattr(args, "log_level", None),
        "health_port": getattr(args, "health_port", None),
        "metrics_port": getattr(args, "metrics_port", None),
        "peering": getattr(args, "peering", None),
    }
    if getattr(args, "all_namespaces", False):
        overrides["namespaces"] = ()
    elif getattr(args, "namespaces", None):
        overrides["namespaces"] = tuple(args.namespaces)
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        raise SystemExit(f"kubetune operator: {exc}") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level.upper() == "INFO":
        # kopf logs "Handler 'follow_pod' succeeded." for every event of every object at INFO: 13
        # lines per job lifecycle and ~5% of the operator's CPU at N = 200. Its warnings and errors
        # (retries, failures) stay; the lines come back with KUBETUNE_LOG_LEVEL=DEBUG.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if settings.metrics_port:
        metrics.start_metrics_server(settings.metrics_port)
    # A plain registry: kopf's default one imports every client library it finds to offer fallback logins.
    kopf.set_default_registry(kopf.OperatorRegistry())
    from kubetune.operator import handlers  # noqa: F401 — registers the handlers

    settle_heap()
    kopf.run(
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        memo=kopf.Memo(settings=settings),
    )
    return 0
