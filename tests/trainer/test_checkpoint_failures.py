"""A checkpoint write that fails on one rank of a two-process run (gloo, CPU) stops every rank at once.

One rank's write is refused (``tests/support/failing_writes``: rank 1's optimizer shard on a full
volume, or rank 0's metadata on a volume turned read-only) and that rank keeps its connections open
afterwards, as a failed peer looks under NCCL; the other rank must not wait at the checkpoint's
barrier for the collective timeout (30 minutes): both say the same one-line reason, naming the rank
and the path, and exit within seconds; the previous checkpoint stays the latest and loads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.trainer import checkpoints
from kubetune.trainer.distributing import COLLECTIVE_TIMEOUT
from tests.support.tiny_models import manifest, write_dataset
from tests.trainer.conftest import trainer_env
from tests.trainer.test_checkpointing import _assert_intact

HOOK = Path(__file__).resolve().parents[1] / "support" / "failing_writes"
#: How long the ranks may take to stop once the write failed; the old code waited out COLLECTIVE_TIMEOUT.
STOP_WITHIN_S = 30
#: How long the test waits before it gives up on a hanging run (and fails).
GIVE_UP_S = 90
#: The failing rank keeps its connections open this long (as NCCL peers look, see the hook): the
#: others must learn of the failure from the save itself, not from the failing process going away.
LINGER_S = 600


def _start(run_dir: Path, job: dict, fail: str, nproc: int = 2, extra: tuple[str, ...] = (),
           linger_s: float = LINGER_S) -> subprocess.Popen:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    env = trainer_env(
        PYTHONPATH=os.pathsep.join([str(HOOK), *filter(None, [os.environ.get("PYTHONPATH")])]),
        KUBETUNE_TEST_FAIL_WRITES=fail, KUBETUNE_TEST_FAIL_WRITES_MARK=str(run_dir / "failed-at"),
        KUBETUNE_TEST_FAIL_WRITES_LINGER=str(linger_s),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune", "train", "-f", str(run_dir / "job.yaml"), "-o", str(run_dir),
         "--no-progress", "--nproc", str(nproc), *extra],
        cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> str:
    """Kill the run and its workers (torchrun starts each in a session of its own); its output."""
    import psutil  # a dependency of deepspeed

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    return proc.communicate()[0].decode()


def _wait_after_failure(proc: subprocess.Popen, run_dir: Path) -> tuple[float, str]:
    """Seconds from the refused write until every process exited, and the run's output."""
    mark = run_dir / "failed-at"
    deadline = time.monotonic() + 600
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not mark.exists():
        raise AssertionError(f"the injected write failure never happened: {_kill(proc)[-3000:]}")
    try:
        proc.wait(timeout=GIVE_UP_S)
    except subprocess.TimeoutExpired:
        output = _kill(proc)
        raise AssertionError(
            f"still running {GIVE_UP_S} s after one rank's checkpoint write failed (the collective timeout is "
            f"{COLLECTIVE_TIMEOUT}): {output[-3000:]}"
        ) from None
    elapsed = time.time() - float(mark.read_text())
    return elapsed, proc.stdout.read().decode()


CASES = {
    # rank 1's optimizer shard on a full volume, inside DeepSpeed's own save
    "rank 1 shard ENOSPC": ("1", "*/.tmp-step-00000004/state/*", "ENOSPC", "No space left on device"),
    # rank 0's trainer.json (written after every rank's shards) on a volume turned read-only
    "rank 0 metadata EROFS": ("0", "*/.tmp-step-00000004/trainer.json", "EROFS", "Read-only file system"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_write_failing_on_one_rank_stops_every_rank_at_once_and_keeps_the_previous_checkpoint(
        case, tiny_model_dir, train_job, tmp_path):
    rank, pattern, errno_name, strerror = CASES[case]
    data = write_dataset(tmp_path / "data.jsonl", "text", n=48)
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={
        "deepspeed.zeroStage": 2, "training.maxSteps": 6, "checkpointing.everySteps": 2, "data.eval": None,
    })
    run_dir = tmp_path / "run"
    proc = _start(run_dir, job, f"{rank}:{pattern}:{errno_name}")
    elapsed, output = _wait_after_failure(proc, run_dir)
    print(f"{case}: every process exited {elapsed:.1f} s after the refused write")  # shown with -s
    assert proc.returncode == 1, output[-3000:]
    assert elapsed < STOP_WITHIN_S, f"{elapsed:.1f} s: {output[-3000:]}"
    root = run_dir / "checkpoints"
    said = [line.split("kubetune.trainer: ", 1)[1] for line in output.splitlines() if "ERROR kubetune.trainer: " in line]
    assert len(said) == 2 and said[0] == said[1], output[-4000:]  # every rank, the same line
    reason = said[0]
    assert reason.startswith(f"checkpointing: cannot write step-00000004 to {root} (rank {rank} of 2"), reason
    assert strerror in reason and "the previous checkpoint step-00000002 is intact" in reason, reason
    assert "Traceback" not in output, output[-4000:]
    assert checkpoints.find_latest(root).name == "step-00000002"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("step-", ".tmp-"))) == ["step-00000002"]
    _assert_intact(root)
    if rank == "1":  # the volume has room again: both ranks resume from the previous checkpoint
        again = train_job(job, run_dir, nproc=2)
        assert again.rc == 0, again.output[-4000:]
        assert "resumed from" in again.output and "at step 2" in again.output
        assert again.checkpoint_state(6)["step"] == 6



@pytest.mark.slow
def test_a_write_failing_on_one_rank_during_the_sigterm_checkpoint_is_told_by_every_rank(
        tiny_model_dir, train_job, tmp_path):
    """Preemption: every rank saves at the same step after a SIGTERM; rank 1's shard is refused. Both
    ranks say why within seconds, the previous checkpoint stays the latest. (torchrun, stopping on
    the SIGTERM, kills a rank still there after 30 s, as the kubelet would: without the agreement the
    other rank died in the barrier without a word.)"""
    from datetime import datetime

    from tests.trainer.test_checkpointing import _wait_for_step

    data = write_dataset(tmp_path / "data.jsonl", "text", n=64)
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={
        "deepspeed.zeroStage": 2, "training.maxSteps": 2, "checkpointing.everySteps": 1000, "data.eval": None,
    })
    run_dir = tmp_path / "run"
    first = train_job(job, run_dir, nproc=2)  # ends with the checkpoint of step 2
    assert first.rc == 0, first.output[-3000:]
    # The failed rank lingers only 5 s here: the assertions are on what every rank says within
    # STOP_WITHIN_S, and torchrun would otherwise wait out its 30 s SIGTERM grace for that rank. Without
    # the agreement rank 0 still never says why (it dies in the barrier when the socket closes).
    proc = _start(run_dir, job, "1:*/.tmp-step-*/state/*:ENOSPC", extra=("--max-steps", "400"), linger_s=5)
    _wait_for_step(proc, run_dir, 4)
    proc.send_signal(signal.SIGTERM)  # to `kubetune train`, which passes it on to torchrun and the ranks
    _, output = _wait_after_failure(proc, run_dir)
    failed_at = float((run_dir / "failed-at").read_text())
    said = [line.split(" ERROR kubetune.trainer: ", 1) for line in output.splitlines() if " ERROR kubetune.trainer: " in line]
    assert len(said) == 2 and said[0][1] == said[1][1], output[-4000:]  # every rank, the same line
    told = [datetime.strptime(when[-23:], "%Y-%m-%d %H:%M:%S,%f").timestamp() - failed_at for when, _ in said]
    print(f"sigterm: both ranks said why {max(told):.1f} s after the refused write")  # shown with -s
    assert max(told) < STOP_WITHIN_S, output[-3000:]
    root, reason = run_dir / "checkpoints", said[0][1]
    assert f"to {root} (rank 1 of 2, .tmp-step-" in reason and "No space left on device" in reason, reason
    assert "the previous checkpoint step-00000002 is intact" in reason and "Traceback" not in output
    assert checkpoints.find_latest(root).name == "step-00000002"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("step-", ".tmp-"))) == ["step-00000002"]
    _assert_intact(root)

# ---------------------------------------------------------------- every path of a save reaches the agreement


class _Writer:
    """DeepSpeed's checkpoint engine: its ``save`` writes one file."""

    def __init__(self, refuse: Exception | None) -> None:
        self.refuse = refuse

    def save(self, state_dict: dict, path: str) -> None:
        import torch

        if self.refuse is not None:
            raise self.refuse
        torch.save(state_dict, path)


class _Engine:
    """Saves like DeepSpeed: collectives before and after the writes, which go through the writer."""

    def __init__(self, rank: int, refuse: Exception | None = None) -> None:
        self.rank, self.checkpoint_engine = rank, _Writer(refuse)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> bool:
        import torch

        torch.distributed.barrier()
        Path(save_dir, tag).mkdir(exist_ok=True)
        self.checkpoint_engine.save({"rank": self.rank}, str(Path(save_dir, tag, f"shard-{self.rank}.pt")))
        torch.distributed.barrier()
        return True


def _save_on_two_ranks(rank: int, root: str, port: int, results: object) -> None:
    """One rank of a 2-process gloo group: a good save, then each failure in turn; what each raised."""
    import errno
    from datetime import timedelta
    from unittest import mock

    import torch

    store = torch.distributed.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=60))
    # The collective timeout is long, as in the trainer: a rank left waiting shows up as the test's timeout.
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(minutes=30))
    base = Path(root)
    kwargs = dict(rank=rank, keep_last=5, keep_best=True, metric="eval_loss", mode="min")

    def attempt(step: int, engine: _Engine) -> str:
        state = {"step": step, "metrics": {"eval_loss": 1.0 / step}}
        try:
            checkpoints.save(engine, base, state, **kwargs)
        except checkpoints.CheckpointStorageError as exc:
            return f"CheckpointStorageError: {exc}"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    outcome = {"good": attempt(2, _Engine(rank))}
    full = OSError(errno.ENOSPC, "No space left on device", str(base / ".tmp-step-00000004" / "state" / "shard-1.pt"))
    outcome["shard"] = attempt(4, _Engine(rank, full if rank == 1 else None))
    outcome["bug"] = attempt(6, _Engine(rank, ValueError("cannot pickle 'generator' object") if rank == 1 else None))
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kw: object) -> None:  # rank 0 cannot make the folder
        if self.name == ".tmp-step-00000008":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kw)

    with mock.patch.object(Path, "mkdir", mkdir):
        outcome["folder"] = attempt(8, _Engine(rank))
    with mock.patch.object(checkpoints, "_update_best", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        outcome["best"] = attempt(10, _Engine(rank))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    results.put((rank, outcome))  # type: ignore[attr-defined]


def test_every_path_of_a_save_reaches_the_agreement_on_every_rank(tmp_path, monkeypatch):
    """A refused shard on rank 1 (inside the engine's own collectives), a bug on rank 1, rank 0
    failing before any rank wrote, and rank 0 failing after the rename: no rank is left waiting,
    every rank raises, the same one line where the volume refused."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_save_on_two_ranks, args=(rank, str(tmp_path), port, results)) for rank in (0, 1)]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks inherit it
    for proc in procs:
        proc.start()
    try:
        outcomes = dict(results.get(timeout=GIVE_UP_S) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    zero, one = outcomes[0], outcomes[1]
    assert zero["good"] == one["good"] == "ok"
    assert zero["shard"] == one["shard"], (zero["shard"], one["shard"])
    assert zero["shard"].startswith(f"CheckpointStorageError: checkpointing: cannot write step-00000004 to {tmp_path} "
                                    "(rank 1 of 2, .tmp-step-00000004/state/shard-1.pt): No space left on device")
    assert "the previous checkpoint step-00000002 is intact" in zero["shard"]
    # A bug is no storage problem: its rank raises it as it is (a traceback), the others one line naming it.
    assert one["bug"] == "ValueError: cannot pickle 'generator' object"
    assert zero["bug"].startswith("CheckpointStorageError: checkpointing: cannot write step-00000006 to "), zero["bug"]
    assert "(rank 1 of 2): ValueError: cannot pickle 'generator' object" in zero["bug"]
    assert zero["folder"] == one["folder"] and "(rank 0 of 2, .tmp-step-00000008): Read-only file system" in zero["folder"]
    assert zero["best"] == one["best"] and "step-00000010 itself is complete and the latest" in zero["best"]
    assert checkpoints.find_latest(tmp_path).name == "step-00000010"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step-", ".tmp-"))) == [
        "step-00000002", "step-00000010"]  # no half-written folder is left, none is marked complete
