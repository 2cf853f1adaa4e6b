"""Ending a trainer process whose work is done without Python's interpreter teardown.

Called last by the trainer's process entry points: ``python -m kubetune.trainer`` (each worker, in
pods and under ``kubetune train --nproc N``), ``python -m kubetune.trainer.launching`` (the torchrun
launcher of multi-process pods and local runs) and the ``kubetune`` command after a local training
run in its own process. With torch, transformers and DeepSpeed loaded (~4,800 modules, ~540,000
objects) the interpreter's own finalisation, after the last atexit handler, clears every module and
frees every object one by one: 1.5-2.7 s of CPU per trainer process measured on the 2-core CI
machine, ~1 s for the launcher (which loads torch too), three such processes per two-process start.
Nothing in it is work the run needs: the files, checkpoints, logs and status are written by then.

:func:`end_process` keeps everything an ordinary exit does for the run and skips only that
teardown. In order: it falls back to an ordinary ``sys.exit`` while a non-daemon thread other than
the main one is alive (the interpreter would wait for it); it destroys a process group still open
(the trainer destroys multi-process groups itself after a barrier; a one-process run keeps its group
for a later run in the same process, see ``Trainer.cleanup``); it waits for queued CUDA work; it
runs the atexit handlers, as an ordinary exit does (``logging.shutdown`` flushes and closes every log
handler; torch's, DeepSpeed's and multiprocessing's own clean-ups run); it flushes stdout and
stderr; then ``os._exit`` with the code. The operating system frees the memory, closes the
descriptors and the GPU driver releases the device as at any process exit; NCCL communicators are
destroyed with the process group before it. Any error on the way takes the ordinary exit instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def _other_live_threads() -> list[threading.Thread]:
    """Non-daemon threads besides the main one: an ordinary exit would join them first."""
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def _close_torch() -> None:
    """Destroy a process group still open and wait for queued CUDA work (only where torch is loaded)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    distributed = getattr(torch, "distributed", None)
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        cuda.synchronize()


def end_process(code: int) -> NoReturn:
    """Exit with ``code`` as ``sys.exit`` would, without the interpreter's teardown (see the module doc)."""
    if _other_live_threads():
        sys.exit(code)
    try:
        _close_torch()
    except Exception:  # noqa: BLE001 - the ordinary exit, which reports it
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: an ordinary exit drops it too
            pass
    os._exit(code)
