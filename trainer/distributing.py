"""The process group of a run: starting it from torchrun's environment, fast, and all-reducing on it.

Called by the training loop (``kubetune.trainer.training``) before anything else, and by whoever
sums counters across ranks (progress, evaluation, EWC's Fisher). One process needs no network (an
in-memory store); several reach ``MASTER_ADDR:MASTER_PORT`` within ``KUBETUNE_RENDEZVOUS_TIMEOUT``
or fail with one line (:class:`RendezvousError`). On CPU the group uses gloo, and the shared-memory
all-reduce op that DeepSpeed builds at start-up is skipped: it serves only inference all-reduce, and
compiling it costs ~40 s on a fresh machine.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch


def all_reduce(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """All-reduce a (host) tensor across the process group and return the result on the host.

    NCCL reduces device tensors only, gloo host tensors: the tensor travels to the group's device
    and back, so callers can keep counters wherever they like."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    moved = tensor.to(device)
    torch.distributed.all_reduce(moved, op=op if op is not None else torch.distributed.ReduceOp.SUM)
    return moved.to(tensor.device)


#: Seconds a process of a multi-process run waits to reach the rendezvous (``MASTER_ADDR:MASTER_PORT``)
#: before it gives up with one line; ``KUBETUNE_RENDEZVOUS_TIMEOUT`` overrides it. Under torchrun
#: (local ``--nproc N`` and the operator's pods) the launcher's store is already up when a worker
#: starts, so the wait is only ever long when the address is wrong or unreachable.
RENDEZVOUS_TIMEOUT_S = 60.0
#: How long collectives (and the store, once reached) may take: a slow checkpoint save on one rank
#: must not time out the others.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class RendezvousError(RuntimeError):
    """A process of a multi-process run could not reach the rendezvous; the message is one line."""


def init_distributed(on_gpu: bool) -> None:
    """Start the process group from torchrun's environment.

    A single process needs no network: its group lives on an in-memory store (``MASTER_ADDR`` and
    ``MASTER_PORT`` are ignored even if the shell has them set). Several processes reach the TCP
    store at ``MASTER_ADDR:MASTER_PORT`` within ``KUBETUNE_RENDEZVOUS_TIMEOUT`` seconds or raise
    :class:`RendezvousError` (torch alone would retry for the 30-minute collective timeout,
    printing C++ stack frames at every try)."""
    import importlib
    import sys

    import deepspeed

    if not on_gpu:
        # ``import deepspeed.comm.torch as m`` would bind the ``torch`` attribute of deepspeed.comm
        # (the real torch), so take the submodule from sys.modules.
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # see the module doc
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if on_gpu else "gloo"
    if not torch.distributed.is_initialized():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world_size == 1:
            store: Any = torch.distributed.HashStore()
        else:
            store = _reach_rendezvous(rank, world_size)
        torch.distributed.init_process_group(
            backend, store=torch.distributed.PrefixStore("default_pg", store), rank=rank, world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
    # DeepSpeed adopts the group that is already there.
    deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT, auto_mpi_discovery=False)


def rendezvous_timeout() -> float:
    raw = os.environ.get("KUBETUNE_RENDEZVOUS_TIMEOUT")
    try:
        value = float(raw) if raw else RENDEZVOUS_TIMEOUT_S
    except ValueError:
        raise RendezvousError(f"KUBETUNE_RENDEZVOUS_TIMEOUT: must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else RENDEZVOUS_TIMEOUT_S


def _reach_rendezvous(rank: int, world_size: int) -> Any:
    """The TCP store of a multi-process run, reached within :func:`rendezvous_timeout` seconds."""
    import socket
    import time

    addr = os.environ.get("MASTER_ADDR")
    port_text = os.environ.get("MASTER_PORT")
    if not addr or not port_text or not port_text.isdigit():
        raise RendezvousError(
            f"rendezvous: rank {rank} of {world_size} needs MASTER_ADDR and MASTER_PORT (a port number); "
            f"got MASTER_ADDR={addr!r} MASTER_PORT={port_text!r}"
        )
    port = int(port_text)
    limit = rendezvous_timeout()
    deadline = time.monotonic() + limit
    where = f"{addr}:{port}"
    # Rank 0 serves the store itself unless torchrun's agent already does; everyone else is a client
    # and first waits in Python for the port to accept connections, quietly.
    serves = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    if not serves:
        last = "no answer"
        while True:
            try:
                with socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                    break
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"rendezvous: rank {rank} of {world_size} could not reach {where} within {limit:g} s "
                    f"({last}); check MASTER_ADDR/MASTER_PORT, or raise KUBETUNE_RENDEZVOUS_TIMEOUT"
                )
            time.sleep(0.2)
    left = max(1.0, deadline - time.monotonic())
    try:
        # torch's own env:// rendezvous (agent store or multi-tenant store on rank 0), bounded.
        store, _, _ = next(torch.distributed.rendezvous("env://", rank, world_size, timeout=timedelta(seconds=left)))
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousError(
            f"rendezvous: rank {rank} of {world_size} could not use the store at {where} within {limit:g} s ({first})"
        ) from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    return store
