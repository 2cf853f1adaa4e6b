"""One trainer process from start to exit: paths, logging, the reporter, the loop, the exit code.

Called by ``python -m kubetune.trainer`` in pods (``kubetune.trainer.__main__``, paths from the
environment the operator sets) and by ``kubetune train`` (``kubetune.trainer.local``, paths from
the run directory) — the same :func:`run` either way. Environment read in pods:

===========================  ==============================================================================
KUBETUNE_JOB_NAME            the FineTuneJob's name (the config's metadata wins if set)
KUBETUNE_NAMESPACE           its namespace
KUBETUNE_OUTPUT_DIR          final model (default /workspace/``spec.output.path``, else /workspace/output); an
                             s3:// ``spec.output.path`` is uploaded from /workspace/output when training ends
KUBETUNE_FETCH_DIR           cache of fetched s3:// sources (see ``kubetune.trainer.fetching``)
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
from typing import Any, Callable

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
    #: Called in this process after each evaluation during training with (step, metrics); a
    #: returned reason stops the run there, as early stopping does (a search's pruner; one process only).
    after_evaluation: Callable[[int, dict[str, float]], str | None] | None = None


def pod_paths(job: Any) -> RunPaths:
    env = os.environ
    path = job.spec.output.path
    local_output = path if path and not path.startswith("s3://") else "output"
    output = Path(env.get("KUBETUNE_OUTPUT_DIR") or Path("/workspace") / local_output)
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
    from kubetune.trainer.techniques.base import arranging_technique

    arranging = arranging_technique(job.spec)
    if arranging is not None:
        # One process trains one run: the operator makes a child FineTuneJob per run (without the
        # arranging block) and `kubetune train` runs them itself (the technique's local hook).
        log.error(
            "%s: the trainer trains one run, and %s arranges several; apply the job to a cluster (the "
            "operator runs each as a child FineTuneJob) or run it with `kubetune train -f`, which runs them "
            "one after another", arranging.where(), arranging.title.lower(),
        )
        return EXIT_BAD_INPUT
    _share_cores()
    from kubetune.trainer import buckets

    buckets.use_spec(job.spec)
    if rank == 0 and buckets.is_s3(job.spec.output.path):
        try:  # a missing bucket or refused credentials fail now, not after training
            buckets.check_writable(job.spec.output.path, "spec.output.path")
        except SourceError as exc:
            log.error("%s", exc)
            write_termination_message(str(exc))
            return EXIT_BAD_INPUT
    if options.max_steps is not None:
        training = job.spec.training.model_copy(update={"max_steps": options.max_steps})
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"training": training})})
    from kubetune.trainer.checkpoints import CheckpointStorageError
    from kubetune.trainer.distributing import RendezvousError
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
