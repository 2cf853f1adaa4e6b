"""The ``kubetune`` console script: one entry point for users, the operator and the pods.

Subcommands import their layer lazily, so ``kubetune validate`` and ``kubetune operator`` work in
the operator image, which has no torch.

    kubetune validate -f job.yaml [-f more.yaml | -f -]   check manifests and their local data, one line per problem
    kubetune crd                                           print the FineTuneJob CRD
    kubetune render -f job.yaml                            print what the operator would create
    kubetune train -f job.yaml [--restart]                 train locally from the same manifest (resumes the same run)
    kubetune operator                                      run the operator
    kubetune submit -f job.yaml [--follow]                 validate and create it in the cluster, follow it
    kubetune status|logs|wait|delete NAME                  a job in the cluster (kubetune.following)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn, Sequence


def _at_least(low: int):  # noqa: ANN202 - an argparse type
    """An argparse type: an integer >= ``low`` (``--max-steps -1`` trained 0 steps and reported success)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} (got {text!r})") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} (got {value})")
        return value
    return parse


def _files(args: argparse.Namespace) -> list[str]:
    files = list(args.file or []) + list(getattr(args, "paths", None) or [])
    if not files:
        raise SystemExit("kubetune: give at least one manifest with -f FILE (or - for stdin)")
    return files


def preview_lines(job: object, base_dir: Path, limit: int) -> list[str]:
    """The first examples as the model will read them (templates, prefixes, control codes applied).

    Needs the trainer's data code (``kubetune[train]``) and the data files; a missing piece is
    reported as a line, never a traceback, so validation itself still stands.
    """
    try:
        from kubetune.trainer.previewing import preview
    except ImportError as exc:  # the operator image has no trainer stack
        return [f"(no preview: {exc.name} is not installed; install kubetune[train])"]
    try:
        texts = preview(job.spec, base_dir, limit)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - a preview must not turn a valid manifest into a crash
        return [f"(no preview: {exc})"]
    lines = []
    for i, text in enumerate(texts):
        lines.append(f"example {i + 1}:")
        lines.extend(f"  | {line}" for line in str(text).splitlines() or [""])
    return lines


def _data_problems(name: str, jobs: list) -> list[str]:
    """What the trainer would refuse in the local data of ``jobs`` (see kubetune.trainer.checking)."""
    try:
        from kubetune.trainer.checking import check_data
    except ImportError:  # pragma: no cover - the trainer's readers ship with every install
        return []
    base = Path(name).resolve().parent if name != "<stdin>" else Path.cwd()
    hint = " (data that only the trainer image holds: --no-data-check)"
    return [f"{name}: {problem}{hint if 'does not exist' in problem else ''}"
            for job in jobs for problem in check_data(job.spec, base)]


def _base_dir(name: str) -> Path:
    """The folder relative data paths of a manifest resolve against."""
    return Path(name).resolve().parent if name != "<stdin>" else Path.cwd()


def cmd_validate(args: argparse.Namespace) -> int:
    from kubetune.api.validating import validate_file

    failed = False
    for path in _files(args):
        name, jobs, problems = validate_file(path)
        if not problems and not args.no_data_check:
            problems = _data_problems(name, jobs)
        for line in problems:
            print(line)
        failed = failed or bool(problems)
        if not problems and not args.quiet:
            for job in jobs:
                techniques = ", ".join(job.spec.techniques.enabled()) or "none"
                print(f"{name}: {job.name}: valid (peft {job.spec.peft.method}; techniques: {techniques})")
                if args.preview:
                    for line in preview_lines(job, _base_dir(name), args.preview):
                        print(f"  {line}")
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune.api.crds import render_crd

    text = render_crd()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """``kubetune render``: what the operator would create (``kubetune.operator.rendering``), each
    job's output prefixed with its first training examples as comments with ``--preview N``."""
    from kubetune.api.validating import validate_file
    from kubetune.operator.building import BuildOptions
    from kubetune.operator.rendering import render_job, with_namespace
    from kubetune.operator.settings import Settings

    files = _files(args)
    try:
        settings = Settings.from_env(trainer_image=args.image)
    except ValueError as exc:
        print(f"kubetune render: {exc}", file=sys.stderr)
        return 2
    options = BuildOptions.from_settings(settings)
    rendered: list[str] = []
    failed = False
    for path in files:
        name, jobs, problems = validate_file(path)
        for line in problems:
            print(line, file=sys.stderr)
        failed = failed or bool(problems)
        for job in jobs:
            text = render_job(with_namespace(job, args.namespace), options)
            if args.preview:
                lines = [f"preview of {job.name}:", *preview_lines(job, _base_dir(name), args.preview)]
                text = "".join(f"# {line}\n" for line in lines) + text
            rendered.append(text)
    if failed:
        return 1
    sys.stdout.write("---\n".join(rendered))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kubetune.trainer.local import train_main

    return train_main(args)


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetune.operator.loading import without_client_libraries

    with without_client_libraries():  # kopf would import the kubernetes client the operator does not use
        from kubetune.operator.running import operator_main

    return operator_main(args)


def build_parser() -> argparse.ArgumentParser:
    from kubetune import __version__

    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune language models on Kubernetes with FineTuneJob manifests.")
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check FineTuneJob manifests; exit 1 with one line per problem")
    p.add_argument("-f", "--file", action="append", help="manifest file, or - for stdin (repeatable)")
    p.add_argument("paths", nargs="*", help="more manifest files")
    p.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    p.add_argument("--no-data-check", action="store_true",
                   help="check the manifest only, not the local data files it names (read them by default)")
    p.add_argument("--preview", type=_at_least(0), default=0, metavar="N", help="also show the first N training examples as the model will read them")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("render", help="print the objects the operator would create for a manifest")
    p.add_argument("-f", "--file", action="append", help="manifest file, or - for stdin")
    p.add_argument("paths", nargs="*", help="more manifest files")
    p.add_argument("-n", "--namespace", default=None, help="namespace to render into (default: the manifest's, else default)")
    p.add_argument("--image", default=None, help="trainer image (default: the operator's default)")
    p.add_argument("--preview", type=_at_least(0), default=0, metavar="N", help="prefix the output with the first N training examples, as YAML comments")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("train", help="train locally from a FineTuneJob manifest")
    p.add_argument("-f", "--file", required=True, help="manifest file")
    p.add_argument("-o", "--output-dir", default=None, help="run directory (default ./runs/<name>)")
    p.add_argument("--nproc", type=_at_least(1), default=None, help="processes (default: GPUs, or 1 on CPU)")
    p.add_argument("--max-steps", type=_at_least(1), default=None, help="override spec.training.maxSteps (quick tries)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--restart", action="store_true",
                   help="start over: remove this run's checkpoints instead of resuming (also after a spec edit)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("operator", help="run the operator")
    p.add_argument("--namespace", action="append", dest="namespaces", help="namespace to watch (repeatable); default all")
    p.add_argument("--all-namespaces", action="store_true", help="watch all namespaces (the default)")
    p.add_argument("--trainer-image", default=None, help="default trainer image")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    p.add_argument("--health-port", type=int, default=None, help="port of the /healthz liveness and readiness endpoint")
    p.add_argument("--metrics-port", type=int, default=None, help="port of the Prometheus /metrics endpoint")
    p.add_argument("--peering", default=None, help="kopf peering name for several replicas (default: standalone)")
    p.set_defaults(func=cmd_operator)

    from kubetune.following import add_parsers

    add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # a run in training checkpoints itself first (kubetune.trainer.training)
        print("kubetune: interrupted", file=sys.stderr)
        return 130


def console(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``kubetune`` command and ``python -m kubetune``: :func:`main`, then the exit. After
    ``kubetune train`` (the trainer imported here) the process ends through the trainer's
    ``end_process``, without the interpreter's teardown of torch and the rest (~2 s of CPU; see
    ``kubetune.trainer.exiting``); every other command, the operator's included, exits as usual."""
    code = main(argv)
    if "kubetune.trainer.local" in sys.modules:
        from kubetune.trainer.exiting import end_process

        end_process(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
