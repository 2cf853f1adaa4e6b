"""The cluster commands of the ``kubetune`` script: submit, status, logs, wait and delete.

``kubetune.cli`` parses the arguments and calls ``*_main`` here; the work is ``kubetune.client``'s.
Following a job (``submit --follow``) draws what ``kubetune train`` draws locally: a progress bar
on a terminal (plain progress lines otherwise), with the checkpoint, evaluation and pod log lines
above it, and the end line.

Exit codes of ``submit --follow`` and ``wait``: 0 Succeeded, 1 Failed, 124 timed out (the job runs
on), 130 interrupted (the job runs on), 2 anything else (bad manifest, no such job, API errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import IO, Any

from kubetune.client import Client, ClientError, InvalidManifest, JobState, Update, WaitTimeout, read_manifests

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_ERROR, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 124, 130


class Display:
    """A followed job in a terminal, drawn by ``kubetune train``'s own ``ProgressDisplay``: a progress
    bar on a terminal (plain progress lines otherwise), every other line above it."""

    def __init__(self, stream: IO[str] | None = None, *, progress_bar: bool = True) -> None:
        from kubetune.trainer.showing import ProgressDisplay

        self.stream = stream if stream is not None else sys.stderr
        self._display = ProgressDisplay(self.stream, progress_bar=progress_bar)

    def show(self, update: Update) -> None:
        if update.kind == "progress" and update.job.progress is not None:
            self._display.show(update.job.progress)
            return
        if update.kind == "end":
            self.close()
        self._display.say(update.text)

    def close(self) -> None:
        self._display.close()


def show_updates(updates: Iterable[Update], display: Display) -> JobState | None:
    """Draw every update; returns the final state (None when the updates ended without one)."""
    last: JobState | None = None
    try:
        for update in updates:
            display.show(update)
            last = update.job if update.kind == "end" else last
    finally:
        display.close()
    return last


def _client(args: argparse.Namespace) -> Client:
    return Client(args.kubeconfig, context=args.context, namespace=args.namespace)


def _exit_for(state: JobState) -> int:
    return EXIT_SUCCEEDED if state.succeeded else EXIT_FAILED


def _run(args: argparse.Namespace, body: Any) -> int:
    """Common error handling: one line on stderr per problem, the documented exit codes."""
    try:
        return int(body())
    except InvalidManifest as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_ERROR
    except WaitTimeout as exc:
        print(f"kubetune: {exc}; the job runs on (kubetune status {exc.state.name})", file=sys.stderr)
        return EXIT_TIMEOUT
    except ClientError as exc:
        print(f"kubetune: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nkubetune: stopped following; the job runs on", file=sys.stderr)
        return EXIT_INTERRUPTED


def submit_main(args: argparse.Namespace) -> int:
    def body() -> int:
        # The manifest first: a wrong one is reported without a cluster (or a kubeconfig) at hand.
        bodies = read_manifests(args.file)
        if args.follow and len(bodies) != 1:
            raise InvalidManifest([f"{args.file}: holds {len(bodies)} FineTuneJobs; submit one at a time"])
        with _client(args) as client:
            if args.follow:
                state = client.submit(bodies[0], namespace=args.namespace)
                print(f"finetunejob.{state.namespace}/{state.name} created", flush=True)
                final = show_updates(
                    client.follow(state.name, namespace=state.namespace, logs=not args.no_logs, poll=args.poll,
                                  timeout=args.timeout),
                    Display(progress_bar=not args.no_progress))
                return _exit_for(final) if final is not None else EXIT_ERROR
            for state in client.submit_all(bodies, namespace=args.namespace):
                print(f"finetunejob.{state.namespace}/{state.name} created"
                      f" (follow it: kubetune status {state.name}, kubetune wait {state.name})")
            return EXIT_SUCCEEDED
    return _run(args, body)


def status_main(args: argparse.Namespace) -> int:
    def body() -> int:
        with _client(args) as client:
            state = client.get(args.name, namespace=args.namespace)
        if args.output == "json":
            print(json.dumps(state.body.get("status") or {}, indent=2, sort_keys=True))
        else:
            print("\n".join(state.describe()))
        return EXIT_SUCCEEDED
    return _run(args, body)


def logs_main(args: argparse.Namespace) -> int:
    def body() -> int:
        with _client(args) as client:
            for line in client.logs(args.name, namespace=args.namespace, follow=args.follow, tail_lines=args.tail):
                print(line, flush=args.follow)
        return EXIT_SUCCEEDED
    return _run(args, body)


def wait_main(args: argparse.Namespace) -> int:
    def body() -> int:
        with _client(args) as client:
            state = client.wait(args.name, namespace=args.namespace, timeout=args.timeout, poll=args.poll)
        print(f"{state.name}: {state.phase}" + (f": {state.status.message}" if state.status.message else ""))
        return _exit_for(state)
    return _run(args, body)


def delete_main(args: argparse.Namespace) -> int:
    def body() -> int:
        with _client(args) as client:
            done = client.delete(args.name, namespace=args.namespace, keep_output=args.keep_output)
        print(f"finetunejob.{done.namespace}/{done.name} deleted")
        for claim in done.kept_claims:
            print(f"kept claim {claim} (checkpoints and output: pvc://{claim}/output)")
        for claim in done.deleted_claims:
            print(f"claim {claim} is deleted with the job (checkpointing.storage.deleteWithJob; "
                  "--keep-output keeps it)")
        return EXIT_SUCCEEDED
    return _run(args, body)


def add_parsers(sub: Any) -> None:
    """The cluster subcommands, on ``kubetune``'s subparsers."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-n", "--namespace", default=None, help="namespace (default: the manifest's, else the kubeconfig context's)")
        p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)")
        p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")

    p = sub.add_parser("submit", help="validate a FineTuneJob manifest and create it in the cluster")
    p.add_argument("-f", "--file", required=True, help="manifest file, or - for stdin")
    p.add_argument("--follow", action="store_true", help="then show its progress until it ends (exit 0 Succeeded, 1 Failed)")
    p.add_argument("--no-logs", action="store_true", help="with --follow: leave out the trainer pod's log lines")
    p.add_argument("--no-progress", action="store_true", help="with --follow: plain progress lines, no bar")
    p.add_argument("--timeout", type=float, default=None, help="with --follow: stop following after this many seconds (exit 124)")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=submit_main)

    p = sub.add_parser("status", help="show a FineTuneJob's phase, progress, checkpoints and conditions")
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="text (default) or the raw status as JSON")
    common(p)
    p.set_defaults(func=status_main)

    p = sub.add_parser("logs", help="print the log of the job's rank-0 trainer pod")
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("-f", "--follow", action="store_true", help="stream until the container ends")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    common(p)
    p.set_defaults(func=logs_main)

    p = sub.add_parser("wait", help="wait for a FineTuneJob to end: exit 0 Succeeded, 1 Failed, 124 timed out")
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait at most (default: no limit)")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=wait_main)

    p = sub.add_parser("delete", help="delete a FineTuneJob and what it owns")
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("--keep-output", action="store_true",
                   help="keep the workspace claim (checkpoints, trained model) even when deleteWithJob is set")
    common(p)
    p.set_defaults(func=delete_main)
