"""Checkpoints on the job's volume: atomic writes, rotation, the best one, and resuming.

Called by the training loop (``kubetune.trainer.training``) every ``checkpointing.everySteps``
optimizer steps, at the end, and on SIGTERM; and at start-up to find where to resume. Layout under
the checkpoint directory (``KUBETUNE_CHECKPOINT_DIR``, ``<run>/checkpoints`` locally)::

    step-00000040/            a complete checkpoint
        state/                DeepSpeed's files: module, optimizer and LR-scheduler state, per rank
        trainer.json          step, epoch, data position, metrics, total steps, world size and batch shape
        rng-<rank>.pt         each rank's RNG states
        universal/            DeepSpeed's universal form of state/, made on the first resume on
                              another number of processes (``kubetune.trainer.resharding``)
    latest                    the name of the newest complete checkpoint (one line)
    best.json                 {"name", "step", "metric", "value"} of the best by checkpointing.metric
    .tmp-step-00000040/       a checkpoint being written (removed at the next start)

Atomicity: every rank writes into ``.tmp-step-N``; once all have, rank 0 renames it to ``step-N``
(a rename within one filesystem is atomic) and only then replaces ``latest`` (write a temporary
file, then ``os.replace``). A crash at any point leaves ``latest`` naming a complete checkpoint,
and :func:`find_latest` also falls back to the newest ``step-*`` folder holding ``trainer.json``.
Rotation keeps the newest ``keepLast`` plus the best. Multi-node runs need a shared
(ReadWriteMany) volume, which the API already requires.

Failures: where a barrier would stand between the steps of a save, the ranks agree instead
(:func:`_agree`, an all-reduce of each rank's failure flag): a write refused on any rank (a full or
read-only volume) makes every rank raise the same one-line :class:`CheckpointStorageError`, naming
that rank and file, at once. A bare barrier left the others waiting for the 30-minute collective
timeout whenever the failed rank's exit went unnoticed (NCCL does not notice; gloo does when the
socket closes, and then printed its own traceback on the other ranks instead of the reason).

torch is imported by the functions that use it, not with this module: ``kubetune train --nproc N``
reads the latest checkpoint's state (``trainer.json``) before it starts torchrun, and that parent
process needs no torch (about 1.5 s of CPU at every start).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

STATE_TAG = "state"
TRAINER_STATE = "trainer.json"


class CheckpointStorageError(RuntimeError):
    """The checkpoint volume refused a write (full, read-only, gone); the message names it in one line."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def clean_partial(root: Path) -> None:
    """Remove half-written checkpoints a crash left behind (rank 0, before training)."""
    if root.exists():
        for tmp in root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    if not root.exists():
        return None
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / TRAINER_STATE).exists():
            newer = [p for p in _complete(root) if p.name > candidate.name]
            return newer[-1] if newer else candidate
    complete = _complete(root)
    return complete[-1] if complete else None


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).exists())


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))


def read_best(root: Path) -> dict[str, Any] | None:
    path = root / "best.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def save(
    engine: Any,
    root: Path,
    state: dict[str, Any],
    *,
    rank: int,
    keep_last: int,
    keep_best: bool,
    metric: str,
    mode: str,
) -> tuple[Path, bool, list[Path]]:
    """Write a checkpoint of ``engine`` and ``state`` (every rank calls this).

    Returns its path, whether it is now the best (rank 0 only knows), and the checkpoints rotation
    deleted (rank 0). A write refused on any rank raises :class:`CheckpointStorageError` on every
    rank, with the same message (see :func:`_agree`).
    """
    name = checkpoint_name(int(state["step"]))
    final = root / name
    tmp = root / f".tmp-{name}"
    failure = None
    if rank == 0:  # the folder every rank writes into
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except Exception as exc:
            failure = exc
    _agree(failure, root, name, tmp, rank)
    if final.exists():  # the same step saved twice (e.g. the end right after a periodic save)
        _agree(None, root, name, tmp, rank)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        return final, False, []
    _agree(_write_parts(engine, tmp, rank), root, name, tmp, rank)
    best, deleted, failure = False, [], None
    if rank == 0:
        try:
            best, deleted = _complete_checkpoint(root, name, tmp, state, keep_last, keep_best, metric, mode)
        except Exception as exc:
            failure = exc
    _agree(failure, root, name, tmp, rank)
    return final, best, deleted


def _write_parts(engine: Any, tmp: Path, rank: int) -> Exception | None:
    """This rank's files of the checkpoint (its DeepSpeed shards, its RNG states); the first error,
    or None.

    DeepSpeed's ``save_checkpoint`` runs collectives before and after its writes; a write error
    raised out of it on one rank would leave the others in its last barrier while this rank is
    already in :func:`_agree`. Its writes go through ``engine.checkpoint_engine.save``, so that is
    where the first error is caught: the remaining writes of this rank are skipped and DeepSpeed's
    collectives still run on every rank, in step.
    """
    errors: list[Exception] = []
    writer = getattr(engine, "checkpoint_engine", None)
    real = getattr(writer, "save", None)

    def save(*args: Any, **kwargs: Any) -> Any:
        if errors:
            return None
        try:
            return real(*args, **kwargs)  # type: ignore[misc]
        except Exception as exc:
            errors.append(exc)
            return None

    own = real is not None and "save" in getattr(writer, "__dict__", {})
    if real is not None:
        writer.save = save
    try:
        engine.save_checkpoint(str(tmp), tag=STATE_TAG, save_latest=False)
    except Exception as exc:
        errors.append(exc)
    finally:
        if own:
            writer.save = real
        elif real is not None:
            del writer.save  # the class's own method again
    if not errors:
        try:
            import torch

            with open(tmp / f"rng-{rank}.pt", "wb") as handle:  # a Python file: errors arrive as OSError
                torch.save(_rng_state(), handle)
        except Exception as exc:
            errors.append(exc)
    return errors[0] if errors else None


def _complete_checkpoint(root: Path, name: str, tmp: Path, state: dict[str, Any], keep_last: int, keep_best: bool,
                         metric: str, mode: str) -> tuple[bool, list[Path]]:
    """Rank 0, once every rank wrote its part: the trainer state, the rename into place, ``latest``,
    ``best.json`` and rotation. The volume can turn read-only between two of these (a remount after
    an I/O error): until the rename the checkpoint is not complete, after it ``latest`` may lag."""
    state = {**state, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomic(tmp / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True))
    os.rename(tmp, root / name)
    _fsync_dir(root)
    _write_atomic(root / "latest", name + "\n")
    best = _update_best(root, name, state, metric, mode)
    return best, rotate(root, keep_last, keep_best)


#: Bytes of the failing rank's message that the others receive (a message is one line, well under it).
MESSAGE_BYTES = 2048


def _agree(failure: Exception | None, root: Path, name: str, tmp: Path, rank: int) -> None:
    """Every rank learns whether a step of the save failed on any rank, and if so all fail alike.

    Takes the place of a barrier: each rank calls it after its part of a step of :func:`save`,
    whatever happened (every path of that step ends here, errors included), so no rank can be left
    waiting for the collective timeout by another that gave up. If any rank failed, the lowest
    failing rank's one-line message goes to all, the half-written ``.tmp-step-N`` is removed (rank 0,
    now that no rank writes into it) and every rank raises :class:`CheckpointStorageError` with that
    message; a rank whose own error was not the volume's (a bug) re-raises it, with its traceback.
    One process: the same, without the collectives.
    """
    import torch

    world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    own = None if failure is None else _failure_message(failure, root, name, rank, world)
    if world == 1:
        message = own
    else:
        from kubetune.trainer.distributing import all_reduce

        failed = torch.zeros(world, dtype=torch.int32)
        failed[rank] = int(own is not None)
        failed = all_reduce(failed)
        message = None
        if bool(failed.any()):
            first = int(torch.nonzero(failed)[0])
            text = torch.zeros(MESSAGE_BYTES, dtype=torch.int32)
            if rank == first:
                data = (own or "").encode("utf-8")[:MESSAGE_BYTES]
                text[: len(data)] = torch.tensor(list(data), dtype=torch.int32)
            text = all_reduce(text)
            message = bytes(int(b) for b in text.tolist() if b).decode("utf-8", errors="ignore")
    if message is None:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint taking the space
    if failure is not None and not _is_storage(failure):
        raise failure
    raise CheckpointStorageError(message)


def _is_storage(exc: Exception) -> bool:
    """Whether ``exc`` is the volume refusing a write: an OSError, or torch's C++ writer failing
    (``torch.save`` to a path on a full disk raises ``RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos …``; to a Python file it raises OSError)."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and any(
        words in str(exc) for words in ("inline_container.cc", "PytorchStreamWriter", "cannot be opened"))


def _failure_message(exc: Exception, root: Path, name: str, rank: int, world: int) -> str:
    if isinstance(exc, OSError):
        return str(_storage_error(exc, root, name, rank=rank, world=world))
    where = f" (rank {rank} of {world})" if world > 1 else ""
    first = (str(exc).strip().splitlines() or [""])[0]
    return (f"checkpointing: cannot write {name} to {root}{where}: {type(exc).__name__}: {first}; "
            f"{_kept(root, name)}")


def _storage_error(exc: OSError, root: Path, name: str, *, rank: int = 0, world: int = 1) -> CheckpointStorageError:
    where = ""
    if world > 1:
        where = f" (rank {rank} of {world}"
        if exc.filename:
            path = Path(os.fsdecode(exc.filename))
            where += f", {path.relative_to(root) if path.is_relative_to(root) else path}"
        where += ")"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = ("Mount the checkpoint volume read-write (spec.checkpointing.storage: a claim the pods may write, "
               "or a writable folder for a local run)")
    else:
        fix = "Free or enlarge the checkpoint volume (spec.checkpointing.storage)"
    return CheckpointStorageError(
        f"checkpointing: cannot write {name} to {root}{where}: {exc.strerror or exc} (errno {exc.errno}); "
        f"{_kept(root, name)}. {fix}, then the run resumes from there"
    )


def _kept(root: Path, name: str) -> str:
    """What a failed save left: the previous checkpoint, or this one whole."""
    previous = find_latest(root)
    if previous is not None and previous.name == name:
        pointer = root / "latest"
        if pointer.exists() and pointer.read_text(encoding="utf-8").strip() == name:
            return f"{name} itself is complete and the latest"
        return f"{name} itself is complete, only the 'latest' pointer was not updated"
    return f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _update_best(root: Path, name: str, state: dict[str, Any], metric: str, mode: str) -> bool:
    value = (state.get("metrics") or {}).get(metric)
    if value is None:
        return False
    best = read_best(root)
    better = best is None or (value < best["value"] if mode == "min" else value > best["value"])
    if better:
        record = {"name": name, "step": state["step"], "metric": metric, "value": value}
        _write_atomic(root / "best.json", json.dumps(record, indent=2))
    return better


def rotate(root: Path, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (and the best); returns what was deleted."""
    complete = _complete(root)
    keep = set(complete[-keep_last:])
    best = read_best(root) if keep_best else None
    if best is not None:
        keep.add(root / best["name"])
    deleted = [p for p in complete if p not in keep]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def remove_all(root: Path) -> None:
    """Delete every checkpoint and pointer under ``root`` (a run told not to resume)."""
    for path in root.glob("step-*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("latest", "best.json"):
        (root / name).unlink(missing_ok=True)


def load(engine: Any, path: Path, *, rank: int, weights_only: bool = False) -> dict[str, Any]:
    """Restore ``engine`` (and, unless ``weights_only``, optimizer, scheduler and RNG) from ``path``."""
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=STATE_TAG,
        load_optimizer_states=not weights_only,
        load_lr_scheduler_states=not weights_only,
    )
    if load_path is None:
        raise RuntimeError(f"checkpoint {path}: DeepSpeed found no state to load in {path / STATE_TAG}")
    if not weights_only:
        restore_rng(path, rank)
    return read_state(path)


def restore_rng(path: Path, rank: int) -> bool:
    """Set this process's RNG states from ``rng-<rank>.pt`` of ``path``; False when it has none
    (a rank that did not exist when the checkpoint was taken)."""
    rng = path / f"rng-{rank}.pt"
    if not rng.exists():
        return False
    import torch

    _set_rng_state(torch.load(rng, weights_only=False))
    return True


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
