"""Retrying a status decision until it is written: backoff for what kopf cannot retry.

The operator follows its Jobs, pods and trials from their watch events (a watch is all they need:
no timers, no per-object daemons): ``@kopf.on.event`` handlers, and the work queue the Jobs' and
pods' events go through (``queueing``); kopf logs and drops an event handler's error — it retries
only change-detecting handlers — and the queue logs it too. A status decision that gave up (a 409 because the trainer
wrote progress in between, a 429/5xx, a dropped connection) on the Job's *last* event would leave
the phase stale for ever. So ``statusing.refresh`` and ``searching.reconcile`` run through
:func:`until_written`: each attempt re-reads the FineTuneJob, its Job and pods (level-triggered —
the decision is made from what is there now, not from the event) and the attempts continue with
exponential backoff and jitter (tenacity) until one is written or the object is gone. Errors that
retrying cannot cure (403, 422, a bug) are raised at once. The caller holds the FineTuneJob's lock,
so concurrent decisions for the same job (a create handler's, kopf's handlers') wait behind the
retry and then find nothing left to write; the work queue runs one decision per job at a time anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity

from kubetune.operator import kubeapi

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds of the first wait after a lost attempt; it doubles up to MAX_DELAY.
INITIAL_DELAY = 0.05
#: The longest wait between two attempts.
MAX_DELAY = 10.0
#: Attempts made with no wait at all: a conflict with one trainer write is usually won at once.
IMMEDIATE_ATTEMPTS = 3

def _wait(state: tenacity.RetryCallState) -> float:
    if state.attempt_number < IMMEDIATE_ATTEMPTS:
        return 0.0
    backoff = tenacity.wait_exponential_jitter(initial=INITIAL_DELAY, max=MAX_DELAY, jitter=INITIAL_DELAY)
    return float(backoff(state))  # MAX_DELAY is read at every wait (tests shorten it)


def _log(state: tenacity.RetryCallState) -> None:
    if state.attempt_number >= IMMEDIATE_ATTEMPTS and state.outcome is not None:
        logger.info("%s: attempt %d lost (%s); retrying", getattr(state.fn, "__name__", "status"),
                    state.attempt_number, state.outcome.exception())


def _log_first(exc: BaseException) -> None:
    logger.debug("status decision lost its first attempt (%s); retrying", exc)


async def until_written(attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt`` until it returns; a transient failure means read again and retry, for ever."""
    try:  # nearly every decision is written at once: no retry machinery for those (it is per event)
        return await attempt()
    except Exception as exc:
        if not kubeapi.is_transient(exc):
            raise
        _log_first(exc)
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(kubeapi.is_transient), wait=_wait, stop=tenacity.stop_never,
        before_sleep=_log, reraise=True,
    )
    async for trial in retrying:
        with trial:
            result = await attempt()
    return result
