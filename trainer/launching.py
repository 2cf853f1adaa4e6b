"""``python -m kubetune.trainer.launching <torchrun arguments>``: torchrun that keeps the trainer's
exit codes.

torchrun exits 1 whenever a worker fails, so a pod could not tell Kubernetes that the data or the
spec is bad (exit 2: retrying cannot help, the operator's podFailurePolicy fails the Job at once)
or that the run stopped on SIGTERM after a checkpoint (143). This runs torchrun's own launcher in
this process (same arguments, same rendezvous, same signal handling) and maps the workers' exit
codes: 2 if any worker exited 2, 143 if the workers stopped on SIGTERM, 1 for any other failure.
The operator's multi-process pods and ``kubetune train --nproc N`` start the trainer through it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Sequence

from kubetune.trainer.running import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_TERMINATED


def exit_code(worker_codes: Iterable[int]) -> int:
    """The pod's exit code from its failed workers' exit codes (negative: killed by that signal)."""
    codes = set(worker_codes)
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT
    if codes and codes <= {EXIT_TERMINATED, -signal.SIGTERM}:
        return EXIT_TERMINATED
    return EXIT_FAILED if codes else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as exc:
        return exit_code(failure.exitcode for failure in exc.failures.values())
    except SignalException as exc:  # the pod itself got SIGTERM/SIGINT: workers were stopped
        return 128 + int(exc.sigval)
    return EXIT_OK


if __name__ == "__main__":
    from kubetune.trainer.exiting import end_process

    end_process(main())  # sys.exit's code, without the interpreter's teardown (kubetune.trainer.exiting)
