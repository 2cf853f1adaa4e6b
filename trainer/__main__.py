"""``python -m kubetune.trainer --config /etc/kubetune/job.json``: the trainer pods' entry point.

The operator mounts the validated FineTuneJob (its ConfigMap) as JSON and launches this module once
per process (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT). ``kubetune train``
launches it the same way for multi-process local runs, with ``--local-mode`` and explicit paths. The
config may be a whole FineTuneJob or only its ``spec`` (then the name comes from
``KUBETUNE_JOB_NAME``). Paths and exit codes: see ``kubetune.trainer.running``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence


def read_job(path: str) -> Any:
    """The FineTuneJob in a JSON (or YAML) config file; SpecError when invalid."""
    import yaml

    from kubetune.api import API_VERSION, KIND, parse_job

    text = Path(path).read_text(encoding="utf-8")
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = yaml.safe_load(text)
    if isinstance(body, dict) and "spec" not in body and "kind" not in body:
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": os.environ.get("KUBETUNE_JOB_NAME", "job"), "namespace": os.environ.get("KUBETUNE_NAMESPACE")},
            "spec": body,
        }
    if isinstance(body, dict):
        body.pop("status", None)
        meta = body.get("metadata")
        if isinstance(meta, dict):
            meta.setdefault("name", os.environ.get("KUBETUNE_JOB_NAME", "job"))
            if os.environ.get("KUBETUNE_NAMESPACE"):
                meta.setdefault("namespace", os.environ["KUBETUNE_NAMESPACE"])
    return parse_job(body)


def main(argv: Sequence[str] | None = None) -> int:
    from kubetune.api import SpecError
    from kubetune.trainer.running import EXIT_BAD_INPUT, RunOptions, RunPaths, pod_paths, run

    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer", description="Train from a FineTuneJob config.")
    parser.add_argument("--config", default="/etc/kubetune/job.json", help="FineTuneJob (or spec) as JSON")
    parser.add_argument("--local-mode", action="store_true", help="local run: status file and terminal progress, no Kubernetes")
    parser.add_argument("--base-dir", default=None, help="folder relative sources resolve against")
    parser.add_argument("--output-dir", default=None, help="final model folder")
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint folder")
    parser.add_argument("--run-dir", default=None, help="folder of the local status file")
    parser.add_argument("--max-steps", type=int, default=None, help="override spec.training.maxSteps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        job = read_job(args.config)
    except SpecError as exc:
        for problem in exc.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"{args.config}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    paths = pod_paths(job)
    paths = RunPaths(
        base_dir=Path(args.base_dir) if args.base_dir else paths.base_dir,
        output_dir=Path(args.output_dir) if args.output_dir else paths.output_dir,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else paths.checkpoint_dir,
        run_dir=Path(args.run_dir) if args.run_dir else paths.run_dir,
    )
    return run(job, paths, RunOptions(local=args.local_mode, progress=not args.no_progress, max_steps=args.max_steps))


if __name__ == "__main__":
    from kubetune.trainer.exiting import end_process

    end_process(main())  # sys.exit's code, without the interpreter's teardown (kubetune.trainer.exiting)
