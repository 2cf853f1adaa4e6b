"""Resuming a checkpoint on another number of processes (``resources.nodes`` × ``gpusPerNode`` changed).

Called by the training loop (``kubetune.trainer.training``) at start-up, before the engine is built
(:func:`plan_batch`: which micro-batch and accumulation keep the checkpoint's global batch) and when
it resumes (:func:`load`: the engine, optimizer, scheduler and RNG state of a checkpoint taken on
another world size). A resume on the same number of processes never comes here except for
:func:`plan_batch`, which then returns the checkpoint's own batch shape.

ZeRO 1–3 partition the optimizer state (and with ZeRO-3 the weights) by rank: DeepSpeed's own
loader refuses a checkpoint of another data-parallel size. This module uses DeepSpeed's universal
checkpoint rather than code of its own: rank 0 converts the checkpoint's ``state/`` once with
``deepspeed.checkpoint.ds_to_universal`` into ``<checkpoint>/universal/`` (one folder per parameter
with its fp32 weights, ``exp_avg``, ``exp_avg_sq`` and step; written to a temporary folder and
renamed, so a crash mid-conversion leaves nothing half-done and a later attempt reuses it), and every
rank loads it with the engine's universal loader, which slices each parameter for the new
partitioning. Nothing extra is written at save time, so checkpointing costs the same as before; the
conversion runs only on the first resume after the change (its seconds are logged). A checkpoint
without ZeRO partitions (stage 0) loads the usual way at any size.

What carries over, and how:

* trainable weights, optimizer moments and step count, each group's settings, learning-rate
  schedule: exactly (fp32 values copied). Frozen weights (a LoRA base, a linear probe's backbone)
  come from the model source as on any start: no technique changes a weight it does not train
  (gradual unfreezing keeps every weight in the optimizer and freezes after the resume);
* the global batch (micro × accumulation × processes): kept from the checkpoint, so the schedule,
  the step count and the data per step stay those of the run. The accumulation (and, where it must,
  the micro-batch) is re-derived for the new size; a size that cannot divide the global batch is
  refused with one line (:class:`ReshardError`);
* data position: the checkpoint's offset is converted to global examples consumed in the epoch
  (offset × micro × processes; packs with ``training.packing``) and back, so no example is skipped
  or repeated: the shards interleave the epoch order, so the first N examples of the order are
  exactly those consumed on any world size;
* RNG: per-rank generators cannot map one to one across sizes. Each rank that existed before gets
  its own state back; a new rank is seeded from (seed, step, rank). Training draws random numbers
  only for dropout and noise techniques (NEFTune, adversarial); augmentation is seeded per example
  and does not depend on the world size. So with dropout 0 and no noise technique the step after a
  resharded resume matches an uninterrupted run on the new size up to floating-point reduction
  order (tests/trainer/test_resharding.py); with dropout the masks differ, as across any two seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("kubetune.trainer")

UNIVERSAL_TAG = "universal"


class ReshardError(RuntimeError):
    """A checkpoint cannot continue on this number of processes; the message is one line."""


def saved_world_size(state: dict[str, Any], default: int) -> int:
    return int(state.get("world_size", default))


def batch_of(state: dict[str, Any], spec: Any) -> tuple[int, int, int]:
    """(micro-batch, accumulation, processes) a checkpoint was trained with.

    Older checkpoints record only the world size; their micro-batch and accumulation are the
    spec's (the fingerprint guarantees the training fields did not change)."""
    t = spec.training
    return (
        int(state.get("micro_batch_size", t.micro_batch_size)),
        int(state.get("gradient_accumulation_steps", t.gradient_accumulation_steps)),
        saved_world_size(state, 1),
    )


def plan_batch(state: dict[str, Any], spec: Any, world_size: int, *, checkpoint: str = "the checkpoint") -> tuple[int, int]:
    """(micro-batch, accumulation) on ``world_size`` processes that keep the checkpoint's global batch.

    The micro-batch stays the checkpoint's when it divides the per-process share, else it shrinks
    to the largest divisor (memory never grows); with ``training.packing`` a micro-batch is a pack
    of micro × sequence-length tokens, so it stays and only the accumulation may change.
    """
    micro, accum, saved = batch_of(state, spec)
    if saved == world_size:
        return micro, accum
    global_batch = micro * accum * saved
    where = (f"{checkpoint} was trained on {saved} process{'es' if saved != 1 else ''} with a global batch of "
             f"{global_batch} (micro-batch {micro} × accumulation {accum} × {saved})")
    fix = ("set spec.resources.nodes × gpusPerNode back, or to a count that divides it, "
           "or start over (checkpointing.resume: false / --restart)")
    if global_batch % world_size:
        raise ReshardError(f"spec.resources: {where}; {world_size} processes cannot keep it "
                           f"({global_batch} is not a multiple of {world_size}): {fix}")
    share = global_batch // world_size
    if spec.training.packing:
        if share % micro:
            raise ReshardError(f"spec.resources: {where}; with training.packing the micro-batch (a pack) stays "
                               f"{micro}, and {world_size} processes would need {share / micro:g} packs per step: {fix}")
        return micro, share // micro
    new_micro = max(m for m in range(1, micro + 1) if share % m == 0)
    return new_micro, share // new_micro


def map_offset(offset: int, state: dict[str, Any], spec: Any, world_size: int, micro: int) -> int:
    """The micro-batch offset on ``world_size`` processes of micro-batch ``micro`` that has consumed
    the same global examples of the epoch as ``offset`` did in the checkpoint (see the module doc).
    """
    old_micro, _, saved = batch_of(state, spec)
    consumed = offset * old_micro * saved
    per_micro = micro * world_size
    if consumed % per_micro:
        # An epoch whose length is not a multiple of the accumulation leaves a step across its end;
        # the part of it in this epoch is re-read (less than one optimizer step of examples).
        log.warning("resuming on %d processes: %d examples of this epoch consumed, not a whole number of %d-example "
                    "micro-batch rounds; re-reading the last %d", world_size, consumed, per_micro, consumed % per_micro)
    return consumed // per_micro


def needs_universal(path: Path, state: dict[str, Any], world_size: int) -> bool:
    """Whether the checkpoint at ``path`` holds ZeRO partitions of another world size."""
    if saved_world_size(state, world_size) == world_size:
        return False
    from kubetune.trainer.fused_engine import is_fused_checkpoint

    if is_fused_checkpoint(path / "state"):
        return False  # keyed by parameter name, not partitioned: any DeepSpeed engine reads it as it is
    return any((path / "state").glob("*optim_states.pt"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def convert(path: Path, *, rank: int) -> Path:
    """``<path>/universal``, converted by rank 0 from ``<path>/state`` unless an earlier attempt did."""
    target = path / UNIVERSAL_TAG
    error: list[str] = []
    if rank == 0 and not (target / "zero").is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = path / f".{UNIVERSAL_TAG}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.monotonic()
        args = argparse.Namespace(
            input_folder=str(path / "state"), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress prints are not the trainer's log
                ds_to_universal(args)
            os.rename(tmp, target)
        except Exception as exc:  # noqa: BLE001 - reported to every rank as one line below
            shutil.rmtree(tmp, ignore_errors=True)
            error.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        else:
            log.info("converted %s to a universal checkpoint in %.1f s", path.name, time.monotonic() - started)
    failed = torch.tensor([1.0 if error else 0.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item():
        detail = error[0] if error else "see rank 0's log"
        raise ReshardError(f"checkpoint {path}: converting it for another number of processes failed ({detail})")
    _barrier()
    return target


def load(engine: Any, path: Path, *, weights_only: bool = False) -> None:
    """Load ``<path>/universal`` into ``engine`` (every rank) with DeepSpeed's universal loader."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True  # read per call by the engine and its ZeRO optimizer
    try:
        load_path, _ = engine.load_checkpoint(
            str(path), tag=UNIVERSAL_TAG,
            load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only,
        )
    finally:
        config.load_universal_checkpoint = before
    if load_path is None:
        raise ReshardError(f"checkpoint {path}: DeepSpeed found no universal state in {path / UNIVERSAL_TAG}")
    if not weights_only and engine.zero_optimization_partition_weights():
        _restore_group_settings(engine, path)


def _restore_group_settings(engine: Any, path: Path) -> None:
    """Give every optimizer group its own step counter, learning rate, weight decay and betas back.

    DeepSpeed's ZeRO-3 universal loader copies the first group's settings onto every group; runs
    with several groups (a head learning rate, no decay for norms and biases) would take one step
    with the wrong ones. The checkpoint's groups are in ``universal/zero/optimizer_state.pt``."""
    # It also hands every group one and the same step tensor, which torch's Adam increments in
    # place: with two groups the step would count twice per step (the bias correction drifts).
    for state in engine.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    saved = torch.load(path / UNIVERSAL_TAG / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or []
    live = engine.optimizer.optimizer.param_groups
    if len(groups) != len(live):
        log.warning("resuming %s: %d optimizer groups saved, %d now; every group keeps the first one's settings",
                    path.name, len(groups), len(live))
        return
    for group, loaded in zip(live, groups):
        group.update({k: v for k, v in loaded.items() if k != "params"})


def rng_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank that did not exist when the checkpoint was taken."""
    return (seed * 1_000_003 + step * 7919 + rank) % 2**32


def seed_new_rank(seed: int, step: int, rank: int) -> None:
    import random

    import numpy as np

    value = rng_seed(seed, step, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
