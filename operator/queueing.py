"""A deduplicating, level-triggered work queue: the events of the operator's Jobs and pods, by owner.

What controller-runtime's workqueue does for a Go controller. ``handlers.queue_child_event`` (the
watch-stream hook of ``watching``) notes each event of a managed Job or pod in ``indexing``'s store
as it arrives, in stream order, and adds the owning FineTuneJob's key here; a few worker tasks take
the keys out and bring each FineTuneJob's status in line with what the store holds then
(``handlers.reconcile_children``: ``statusing.refresh``, and ``creating.restore_job`` where a Job
went away). Because the decision is made from the store, not from the event, one decision serves
every event that came before it:

* one pending entry per key: events of a key that is waiting collapse into its entry (what they
  ask for beyond a refresh — the body of a deleted Job, a restore to consider — is merged into it);
* a key being reconciled is not reconciled twice at once; an event arriving meanwhile marks it
  dirty, and it runs once more after (it may have been noted after the store was read);
* a fixed number of workers (``WORKERS``): at most that many status decisions are under way at
  once, however many events arrive in a burst, beside kopf's create handlers for the new
  FineTuneJobs (before, each event was a kopf handler call of its own, all of them at once);
* an error is logged and does not stop a worker; a ``kopf.TemporaryError`` (what
  ``handlers._reconcile`` makes of an API failure the retries did not outlast) adds the key again
  after its delay (``statusing.refresh`` and ``creating.restore_job`` already retry transient
  failures themselves, ``retrying``, so this is the last resort).

Hand-written rather than a library: the queue is ~100 lines over ``asyncio.Queue``; the asyncio
work-queue packages on PyPI deduplicate nothing or carry no dirty-while-processing state, and
controller-runtime's, which defines these semantics, is Go.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf

from kubetune.operator import kubeapi

logger = logging.getLogger(__name__)

Key = tuple[str, str]

#: Worker tasks per operator: as many as the gateway has requests in flight (a decision that writes
#: waits for its answer; with 4 workers the 1000 completions of a burst queued behind each other's
#: writes: p99 complete -> Succeeded 2.2 s -> 22.6 s; bench/README.md, "The children's events
#: through a work queue"). A decision that writes nothing takes one turn of the event loop.
WORKERS = kubeapi.MAX_IN_FLIGHT


@dataclass
class Work:
    """What the events collapsed into one entry ask for, beyond a status refresh from the store."""

    #: The last body of a Job deleted since the entry was added (``statusing.refresh(deleted_job=...)``).
    deleted_job: dict[str, Any] | None = None
    #: A Job was deleted: consider making it again (``creating.restore_job``).
    job_deleted: bool = False
    #: A pod stopped (or went away): consider making its Job again if no Job is seen.
    pod_stopped: bool = False

    def merge(self, later: Work) -> None:
        if later.deleted_job is not None:
            self.deleted_job = later.deleted_job
        self.job_deleted = self.job_deleted or later.job_deleted
        self.pod_stopped = self.pod_stopped or later.pod_stopped


Reconcile = Callable[[Key, Work], Awaitable[None]]


class WorkQueue:
    """Keys waiting for ``reconcile``, each at most once, served by ``workers`` tasks (:meth:`start`)."""

    def __init__(self, reconcile: Reconcile, *, workers: int = WORKERS) -> None:
        if workers < 1:
            raise ValueError(f"workers: must be >= 1 (got {workers})")
        self._reconcile = reconcile
        self._workers = workers
        self._ready: asyncio.Queue[Key] = asyncio.Queue()
        self._pending: dict[Key, Work] = {}  # waiting in _ready, or dirty while being reconciled
        self._processing: set[Key] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._later: set[asyncio.TimerHandle] = set()

    def add(self, key: Key, work: Work | None = None) -> None:
        """Ask for ``key`` to be reconciled; collapses into an entry already waiting. Synchronous:
        called from the watch stream, in the order of its events."""
        work = work or Work()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.merge(work)
            return
        self._pending[key] = work
        if key not in self._processing:  # else it goes back in when its reconcile ends
            self._ready.put_nowait(key)

    def start(self) -> None:
        """Start the workers on the running event loop (once)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._work(), name=f"kubetune-queue-worker-{i}")
                           for i in range(self._workers)]

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def join(self) -> None:
        """Wait until every key added so far has been reconciled (a delayed retry excepted)."""
        await self._ready.join()

    async def stop(self) -> None:
        """Cancel the workers and any delayed retry; what is still waiting is dropped (the next
        operator reads everything again when kopf lists the Jobs and pods at its start)."""
        for handle in self._later:
            handle.cancel()
        self._later.clear()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._pending)

    async def _work(self) -> None:
        while True:
            key = await self._ready.get()
            work = self._pending.pop(key)
            self._processing.add(key)
            try:
                await self._reconcile(key, work)
            except kopf.TemporaryError as exc:
                delay = exc.delay or 1.0
                logger.error("status of %s/%s failed temporarily: %s; again in %g s", *key, exc, delay)
                self._add_later(delay, key, work)
            except Exception:
                logger.exception("status of %s/%s failed with an exception; the next event tries again", *key)
            finally:
                self._processing.discard(key)
                if key in self._pending:  # an event came while it ran: once more
                    self._ready.put_nowait(key)
                self._ready.task_done()

    def _add_later(self, delay: float, key: Key, work: Work) -> None:
        def add() -> None:
            self._later.discard(handle)
            self.add(key, work)

        handle = asyncio.get_running_loop().call_later(delay, add)
        self._later.add(handle)
