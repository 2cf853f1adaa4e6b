"""One trainer process from start to exit: paths, logging, the reporter, the loop, the exit code.

Called by ``python -m kubetune.trainer`` in pods (``kubetune.trainer.__main__``, paths from the
environment the operator sets) and by ``kubetune train`` (``kubetune.trainer.local``, paths from
the run directory) — the same :func:`run` either way. Environment read in pods:

===========================  ==============================================================================
KUBETUNE_JOB_NAME            the FineTuneJob's name (the config's metadata wins if set)
KUBETUNE_NAMESPACE           its namespace
KUBETUNE_OUTPUT_DIR          final model (default ``spec.output.path``, else /workspace/output)
KUBETUNE_CHECKPOINT_DIR      checkpoints (default /workspace/checkpoints)
KUBETUNE_BASE_DIR            relative model/data paths resolve against it (default: cwd)
KUBETUNE_PVC_ROOT            where pvc:// claims are mounted (default /mnt/pvc)
KUBETUNE_RENDEZVOUS_TIMEOUT  seconds a process of a multi-process run waits for MASTER_ADDR:MASTER_PORT (60)
RANK, WORLD_SIZE, …          torchrun's (one process ignores MASTER_ADDR/MASTER_PORT: no network)
===========================  ==============================================================================

When no source of the spec is ``hf://``, ``HF_HUB_OFFLINE=1`` is set (unless already set), so a
run from local or ``pkg://`` files never touches the network.

Exit codes: 0 when training finished (completed, max steps, early stop), 143 after a SIGTERM
checkpoint (the pod will be restarted or the job was suspended), 130 after the same checkpoint on
Ctrl-C (``kubetune train``), 2 for a bad spec or bad data
(retrying cannot help), 1 for anything else.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kubetune.trainer")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TERMINATED = 143
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


@dataclass
class RunPaths:
    """Where a run reads and writes."""

    base_dir: Path  # relative sources resolve against it
    output_dir: Path  # final model + TensorBoard events + training log
    checkpoint_dir: Path
    run_dir: Path  # the reporter's status file lives here (locally)


@dataclass
class RunOptions:
    local: bool = False
    progress: bool = True
    max_steps: int | None = None


def pod_paths(job: Any) -> RunPaths:
    env = os.environ
    output = Path(env.get("KUBETUNE_OUTPUT_DIR") or job.spec.output.path or "/workspace/output")
    checkpoints = Path(env.get("KUBETUNE_CHECKPOINT_DIR") or "/workspace/checkpoints")
    base = Path(env.get("KUBETUNE_BASE_DIR") or os.getcwd())
    return RunPaths(base, output, checkpoints, output.parent)


def configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def make_run_reporter(job: Any, rank: int, local: bool, run_dir: Path, progress_bar: bool = True) -> Any:
    """The status reporter of ``kubetune.trainer.reporting`` (a no-op off rank 0)."""
    from kubetune.trainer.reporting import make_reporter

    return make_reporter(job, rank, local, run_dir, progress_bar=progress_bar)


def _uses_hub(spec: Any) -> bool:
    """Whether any source of the spec (model, tokenizer, datasets, techniques) is an hf:// one."""
    dumped = spec.model_dump_json()
    return '"hf://' in dumped


def _share_cores() -> None:
    """Split this machine's cores among the local processes (torch would give each one all of them)."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


#: Where Kubernetes reads a container's termination message (the operator's pods use the default).
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes Kubernetes keeps of it


def write_termination_message(message: str) -> bool:
    """Tell Kubernetes why the pod failed: the message lands in the pod's status, and from there in
    the FineTuneJob's Failed condition. Writes only where the file exists (Kubernetes creates it in
    every container) or ``KUBETUNE_TERMINATION_LOG`` names one; returns whether it wrote."""
    path = Path(os.environ.get("KUBETUNE_TERMINATION_LOG") or TERMINATION_LOG)
    if "KUBETUNE_TERMINATION_LOG" not in os.environ and not path.exists():
        return False
    data = message.encode("utf-8")[:TERMINATION_MESSAGE_LIMIT].decode("utf-8", errors="ignore")
    try:
        path.write_text(data, encoding="utf-8")
    except OSError:
        return False
    return True


def run(job: Any, paths: RunPaths, options: RunOptions) -> int:
    """Train ``job``; returns the process exit code (see the module doc)."""
    from kubetune.api import SpecError
    from kubetune.trainer.reading import DataError
    from kubetune.trainer.sources import SourceError

    rank = int(os.environ.get("RANK", "0"))
    if not _uses_hub(job.spec):
        # Nothing to fetch: keep transformers/huggingface_hub off the network (set before they import).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging(rank)
    if job.spec.techniques.hyperparameter_search is not None:
        # One process trains one trial: the operator makes a child FineTuneJob per trial (without
        # the search block) and `kubetune train` runs the trials itself (kubetune.trainer.searching).
        log.error(
            "spec.techniques.hyperparameterSearch: the trainer runs one trial, not a search; apply the job "
            "to a cluster (the operator runs each trial as a child FineTuneJob) or run it with "
            "`kubetune train -f`, which runs the trials one after another"
        )
        return EXIT_BAD_INPUT
    _share_cores()
    if options.max_steps is not None:
        training = job.spec.training.model_copy(update={"max_steps": options.max_steps})
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"training": training})})
    from kubetune.trainer.checkpoints import CheckpointStorageError
    from kubetune.trainer.engines import RendezvousError
    from kubetune.trainer.models import ModelError
    from kubetune.trainer.resharding import ReshardError
    from kubetune.trainer.training import Terminated, Trainer

    trainer = None
    succeeded = False
    try:
        trainer = Trainer(job, paths, options)
        trainer.setup()
        trainer.train()
        succeeded = True
        return EXIT_OK
    except Terminated as exc:
        succeeded = True  # every rank saved the checkpoint together
        if exc.signum == signal.SIGINT:
            log.warning("interrupted (Ctrl-C): checkpoint saved at step %d; run the same command again to resume",
                        exc.step)
            return EXIT_INTERRUPTED
        log.warning("stopped by SIGTERM after saving a checkpoint")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        log.warning("interrupted (Ctrl-C) before training started; nothing to save")
        return EXIT_INTERRUPTED
    except (RendezvousError, CheckpointStorageError) as exc:  # one line, no traceback: it says it all
        log.error("%s", exc)
        write_termination_message(str(exc))
        return EXIT_FAILED
    except (SpecError, DataError, SourceError, ModelError, ReshardError) as exc:
        log.error("%s", exc)
        write_termination_message(str(exc))
        return EXIT_BAD_INPUT
    except Exception as exc:
        log.exception("training failed")
        write_termination_message(f"training failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        if trainer is not None:
            trainer.cleanup(succeeded)
