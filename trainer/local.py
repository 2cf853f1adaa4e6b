"""``kubetune train -f job.yaml``: the same manifest the operator runs, trained on this machine.

Called by ``kubetune.cli.cmd_train``. The manifest is validated (problems printed one per line,
like ``kubetune validate``), then trained with the very code the pods run
(``kubetune.trainer.running.run``): in this process for one process, or through torchrun for
``--nproc N`` (default: one per local GPU, else 1). A run lives in ``./runs/<name>`` (or ``-o``):

    runs/<name>/output/        final model, tokenizer, README.md model card, tensorboard/, trainer_log.jsonl
    runs/<name>/checkpoints/   checkpoints (running the same command again resumes from them)
    runs/<name>/status.json    the status a cluster would show (progress, checkpoints)
    runs/<name>/job.json       the validated manifest handed to the trainer processes
    runs/<name>/cache/         s3:// sources fetched before training (``KUBETUNE_FETCH_DIR`` overrides)

Relative sources resolve against the manifest's folder. ``spec.output.path``, when set, is
where the final model goes (relative to the manifest's folder); an ``s3://`` one is uploaded from
``runs/<name>/output`` when training ends (a rerun of a finished run completes an interrupted upload).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


def _load(path: str) -> tuple[object | None, int]:
    from kubetune.api.validating import validate_file

    _, jobs, problems = validate_file(path)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        return None, 2
    if len(jobs) != 1:
        print(f"{path}: holds {len(jobs)} FineTuneJobs; kubetune train runs one at a time", file=sys.stderr)
        return None, 2
    return jobs[0], 0


def train_main(args: argparse.Namespace) -> int:
    from kubetune.trainer.running import RunOptions, RunPaths, run

    job, code = _load(args.file)
    if job is None:
        return code
    manifest_dir = Path(args.file).resolve().parent
    run_dir = Path(args.output_dir or Path("runs") / job.name).resolve()
    output = job.spec.output.path
    output_dir = (manifest_dir / output) if output and not output.startswith("s3://") else run_dir / "output"
    paths = RunPaths(base_dir=manifest_dir, output_dir=output_dir.resolve(), checkpoint_dir=run_dir / "checkpoints", run_dir=run_dir)
    if getattr(args, "restart", False):
        checkpointing = job.spec.checkpointing.model_copy(update={"resume": False})  # removes the old ones
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"checkpointing": checkpointing})})
    elif job.spec.checkpointing.resume:
        refused = _rerun_refused(job, paths, args.max_steps)
        if refused is not None:
            return refused
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # -o names a file, or a folder that cannot be made: one line, not a traceback
        what = "is a file, not a folder" if run_dir.is_file() else f"cannot be made ({exc.strerror or exc})"
        print(f"kubetune: run directory {run_dir} {what}; give another with -o", file=sys.stderr)
        return 2
    code = _fetch(job, run_dir)
    if code:
        return code
    config = run_dir / "job.json"
    config.write_text(json.dumps(job.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2), encoding="utf-8")
    nproc = args.nproc or _default_nproc()
    from kubetune.trainer.techniques.base import arranging_technique

    arranging = arranging_technique(job.spec)
    if arranging is not None and nproc > 1:
        # Its runs (a search's trials) go one after another in this process (its local hook); a
        # cluster runs them in parallel as child FineTuneJobs, each with its own pods and GPUs.
        print(f"kubetune: {arranging.title.lower()} runs its runs in this process, one process each (--nproc {nproc} not used)", file=sys.stderr)
        nproc = 1
    techniques = ", ".join(job.spec.techniques.enabled()) or "none"
    print(f"kubetune: training {job.name} in {run_dir} ({nproc} process{'es' if nproc > 1 else ''}; "
          f"peft {job.spec.peft.method}; techniques: {techniques})", flush=True)
    if nproc == 1:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.setdefault(key, "0" if key != "WORLD_SIZE" else "1")
        options = RunOptions(local=True, progress=not args.no_progress, max_steps=args.max_steps)
        if arranging is not None:
            from kubetune.trainer.techniques.base import local_arranger

            return int(local_arranger(arranging)(job, paths, options))
        return run(job, paths, options)
    command = [
        sys.executable, "-m", "kubetune.trainer.launching", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "kubetune.trainer", "--config", str(config), "--local-mode",
        "--base-dir", str(paths.base_dir), "--output-dir", str(paths.output_dir),
        "--checkpoint-dir", str(paths.checkpoint_dir), "--run-dir", str(paths.run_dir),
    ]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    if args.no_progress:
        command.append("--no-progress")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    proc = subprocess.Popen(command, env=env)
    # SIGTERM to this process (a supervisor stopping the run) goes on to torchrun, which passes it
    # to the workers: they checkpoint and exit. Ctrl-C reaches the whole process group by itself.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the workers got it too; wait for them to finish their checkpoint
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fetch(job: Any, run_dir: Path) -> int:
    """Fetch the s3:// and hf:// sources into the run's cache (one line of what came); 2 when one cannot be."""
    from kubetune.trainer import fetching
    from kubetune.trainer.sources import SourceError

    os.environ.setdefault(fetching.FETCH_DIR_VARIABLE, str(run_dir / "cache"))
    if not fetching.remote_sources(job.spec):
        return 0
    try:
        summary = fetching.fetch_all(job.spec)
    except SourceError as exc:
        print(f"kubetune: {exc}", file=sys.stderr)
        return 2
    print(f"kubetune: {summary.line()} (cache {os.environ[fetching.FETCH_DIR_VARIABLE]})", flush=True)
    return 0


def _upload_finished(job: Any, paths: Any) -> int:
    """A finished run whose output goes to s3://: finish an upload that was interrupted (0, or 2)."""
    from kubetune.trainer import buckets
    from kubetune.trainer.sources import SourceError

    buckets.use_spec(job.spec)
    try:
        report = buckets.upload_folder(paths.output_dir, job.spec.output.path, "spec.output.path")
    except SourceError as exc:
        print(f"kubetune: {exc}", file=sys.stderr)
        return 2
    print(f"kubetune: uploaded {len(report.uploaded)} files to {job.spec.output.path} "
          f"({len(report.skipped)} already there)", flush=True)
    return 0


def _rerun_refused(job: Any, paths: Any, max_steps: int | None) -> int | None:
    """An exit code when the run dir holds a different run (2) or this one, finished (0); else None."""
    from kubetune.trainer import checkpoints
    from kubetune.trainer.fingerprinting import changes, run_length, training_spec

    latest = checkpoints.find_latest(paths.checkpoint_dir)
    if latest is None:
        return None
    state = checkpoints.read_state(latest)
    if max_steps is not None:
        training = job.spec.training.model_copy(update={"max_steps": max_steps})
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"training": training})})
    if "spec" in state:  # checkpoints of older versions carry no fingerprint: resumed as before
        changed = changes(state["spec"], training_spec(job))
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            print(f"kubetune: {paths.run_dir} holds a run of {job.name} with another spec ({changed[0]}{more}); "
                  "not resuming it: rerun with --restart to start over, or -o another folder", file=sys.stderr)
            return 2
    total = state.get("total_steps")
    if total and int(state["step"]) >= int(total) and state.get("length") == run_length(job):
        s3_output = (job.spec.output.path or "").startswith("s3://")
        where = job.spec.output.path if s3_output else paths.output_dir
        print(f"kubetune: {job.name} already finished ({state['step']} steps); its model is in {where} "
              "(--restart trains it again)", flush=True)
        return _upload_finished(job, paths) if s3_output else 0
    return None


def _default_nproc() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover
        return 1
