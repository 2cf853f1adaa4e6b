"""Checkpoints: rotation and the best one, atomic writes, exact resume, kill -9 and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kubetune.trainer import checkpoints
from tests.support.tiny_models import manifest, write_dataset
from tests.trainer.conftest import trainer_env


def _text_job(tiny_model_dir, tmp_path, **overrides):
    data = write_dataset(tmp_path / "data.jsonl", "text", n=48)
    return manifest(tiny_model_dir("llama"), data, "text", overrides=overrides)


def test_keeps_last_k_and_the_best(tiny_model_dir, train_job, tmp_path):
    # Ranking by the *highest* eval loss makes the first checkpoint the best, so best != last.
    job = _text_job(tiny_model_dir, tmp_path, **{
        "training.maxSteps": 8, "checkpointing.everySteps": 1, "checkpointing.keepLast": 2,
        "checkpointing.mode": "max", "data.eval.everySteps": 1,
    })
    run = train_job(job, tmp_path / "run")
    assert run.rc == 0
    best = json.loads((run.checkpoint_dir / "best.json").read_text())
    losses = {s: run.checkpoint_state(s)["metrics"]["eval_loss"] for s in run.steps()}
    assert best["metric"] == "eval_loss" and best["step"] == 1
    assert run.steps() == [1, 7, 8]
    assert best["value"] == losses[1] > losses[8]
    assert (run.checkpoint_dir / "latest").read_text().strip() == "step-00000008"
    # output.exportBest (default on): the final model holds the best checkpoint's weights.
    import torch
    from safetensors.torch import load_file

    exported = load_file(str(run.output_dir / "model.safetensors"))
    best_states = torch.load(run.checkpoint_dir / best["name"] / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    last_states = torch.load(run.checkpoint_dir / "step-00000008" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(exported[name], best_states[name])
    assert not torch.equal(exported[name], last_states[name])


@pytest.mark.parametrize("keep_best", [True, False])
def test_rotation_keeps_the_best_only_when_asked(tmp_path, keep_best):
    """checkpointing.keepLast newest are kept, plus the best one unless keepBest is false."""
    root = tmp_path / "ckpt"
    for step in range(1, 6):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "trainer.json").write_text(json.dumps({"step": step}))
    (root / "best.json").write_text(json.dumps({"name": "step-00000001", "step": 1, "metric": "eval_loss", "value": 0.5}))
    deleted = checkpoints.rotate(root, keep_last=2, keep_best=keep_best)
    left = sorted(p.name for p in root.glob("step-*"))
    assert left == (["step-00000001"] if keep_best else []) + ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in deleted) == [f"step-{s:08d}" for s in ((2, 3) if keep_best else (1, 2, 3))]


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    root = tmp_path / "ckpt"
    good = root / "step-00000004"
    good.mkdir(parents=True)
    (good / "trainer.json").write_text(json.dumps({"step": 4}))
    (root / "latest").write_text("step-00000004\n")
    (root / ".tmp-step-00000006" / "state").mkdir(parents=True)  # crash during the save of step 6
    (root / "step-00000005").mkdir()  # a folder without trainer.json is not a checkpoint
    assert checkpoints.find_latest(root) == good
    checkpoints.clean_partial(root)
    assert not (root / ".tmp-step-00000006").exists()
    (root / "latest").write_text("step-00000009\n")  # pointing at something gone
    assert checkpoints.find_latest(root) == good


def test_resume_continues_steps_and_loss_curve_exactly(tiny_model_dir, train_job, tmp_path):
    job = _text_job(tiny_model_dir, tmp_path, **{"training.maxSteps": 8, "checkpointing.everySteps": 4})
    straight = train_job(job, tmp_path / "straight")
    first = train_job(job, tmp_path / "resumed", max_steps=4)
    second = train_job(job, tmp_path / "resumed", max_steps=8)
    assert straight.rc == first.rc == second.rc == 0
    resumed_log = second.log()
    assert [e["step"] for e in resumed_log] == list(range(1, 9))
    # Same data position, optimizer and scheduler state: the curve is the uninterrupted one.
    assert [e["loss"] for e in resumed_log] == pytest.approx([e["loss"] for e in straight.log()], rel=1e-4)
    assert second.checkpoint_state(8)["step"] == 8
    # The same number of processes resumes DeepSpeed's own files: no conversion for another count.
    assert not (second.checkpoint_dir / "step-00000004" / "universal").exists()
    assert second.checkpoint_state(8)["gradient_accumulation_steps"] == 1


def _start(run_dir, job, nproc=1):
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune", "train", "-f", str(run_dir / "job.yaml"), "-o", str(run_dir), "--no-progress", "--nproc", str(nproc)],
        cwd=run_dir, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_for_step(proc, run_dir, step, timeout=120):
    log = run_dir / "output" / "trainer_log.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            lines = log.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _assert_intact(root):
    """Every complete checkpoint reads back: its trainer state and DeepSpeed's module file load."""
    import torch

    for path in sorted(root.glob("step-*")):
        state = checkpoints.read_state(path)
        assert state["step"] == int(path.name.split("-")[1]), path
        torch.load(path / "state" / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")


KILLS = 3  # SIGKILLs at random steps of one run (the seed is in the failure message)


@pytest.mark.slow
def test_kill_9_at_random_steps_ends_with_exactly_the_requested_steps(tiny_model_dir, train_job, tmp_path):
    import random

    seed = int(os.environ.get("KUBETUNE_FAULT_SEED", str(random.randrange(10**6))))
    rng = random.Random(seed)
    every, total = 10, 80
    job = _text_job(tiny_model_dir, tmp_path, **{"training.maxSteps": total, "checkpointing.everySteps": every, "data.eval": None})
    run_dir = tmp_path / "run"
    resumed_from = 0
    for kill in range(KILLS):
        proc = _start(run_dir, job)
        target = rng.randint(resumed_from + 2, min(total - 5, resumed_from + 2 * every + 5))
        killed_at = _wait_for_step(proc, run_dir, target)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        latest = checkpoints.find_latest(run_dir / "checkpoints")
        _assert_intact(run_dir / "checkpoints")
        saved = checkpoints.read_state(latest)["step"] if latest else 0
        assert saved % every == 0, (seed, saved)
        # The work lost to this kill is at most one checkpoint interval (plus the step in flight).
        assert killed_at - saved <= every + 1, (seed, kill, killed_at, saved)
        assert saved >= resumed_from, (seed, saved, resumed_from)
        resumed_from = saved

    again = train_job(job, run_dir, subprocess_=True)
    assert again.rc == 0, again.output[-3000:]
    if resumed_from:
        assert f"at step {resumed_from}" in again.output, (seed, again.output[-3000:])
    _assert_intact(run_dir / "checkpoints")
    assert again.checkpoint_state(total)["step"] == total
    assert max(again.steps()) == total
    steps = [e["step"] for e in again.log()]
    restart = len(steps) - 1 - steps[::-1].index(resumed_from + 1)  # the last process's first step
    assert steps[restart:] == list(range(resumed_from + 1, total + 1)), seed  # exactly the requested steps
    assert steps[-1] == total and sorted(set(steps)) == list(range(1, total + 1)), seed


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tiny_model_dir, train_job, tmp_path):
    job = _text_job(tiny_model_dir, tmp_path, **{"training.maxSteps": 200, "checkpointing.everySteps": 1000, "data.eval": None})
    run_dir = tmp_path / "run"
    proc = _start(run_dir, job)
    signalled_at = _wait_for_step(proc, run_dir, 15)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    rc = proc.wait(timeout=30)
    output = proc.stdout.read().decode()
    assert rc == 143, output[-3000:]
    assert time.monotonic() - started < 10  # well inside Kubernetes' default 30 s grace period
    latest = checkpoints.find_latest(run_dir / "checkpoints")
    assert latest is not None, output[-3000:]
    step = checkpoints.read_state(latest)["step"]
    assert signalled_at <= step < 200  # saved where it stopped, not at a periodic step

    again = train_job(job, run_dir, subprocess_=True)
    assert again.rc == 0, again.output[-3000:]
    assert again.checkpoint_state(200)["step"] == 200


def test_resume_off_starts_over(tiny_model_dir, train_job, tmp_path):
    job = _text_job(tiny_model_dir, tmp_path, **{"training.maxSteps": 4, "checkpointing.resume": False})
    assert train_job(job, tmp_path / "run").rc == 0
    again = train_job(job, tmp_path / "run", max_steps=2)
    assert again.rc == 0
    assert [e["step"] for e in again.log()] == [1, 2]  # trained from scratch, log started anew
    assert again.steps() == [2]  # the earlier attempt's checkpoints are gone


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_in_one_line_and_exits_130(tiny_model_dir, train_job, tmp_path):
    """Ctrl-C reaches the terminal's whole process group; it takes the SIGTERM path."""
    job = _text_job(tiny_model_dir, tmp_path, **{"training.maxSteps": 200, "checkpointing.everySteps": 1000, "data.eval": None})
    run_dir = tmp_path / "run"
    proc = _start(run_dir, job)
    signalled_at = _wait_for_step(proc, run_dir, 5)
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=30)
    output = proc.stdout.read().decode()
    assert rc == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    latest = checkpoints.find_latest(run_dir / "checkpoints")
    assert latest is not None, output[-3000:]
    step = checkpoints.read_state(latest)["step"]
    assert signalled_at <= step < 200
    said = [line for line in output.splitlines() if "interrupted" in line]
    assert len(said) == 1 and f"checkpoint saved at step {step}" in said[0], output[-3000:]


def test_full_checkpoint_storage_fails_with_a_clear_reason_and_keeps_the_previous_checkpoint(
        tiny_model_dir, train_job, tmp_path, monkeypatch):
    import errno

    import torch

    job = _text_job(tiny_model_dir, tmp_path, **{"training.maxSteps": 6, "checkpointing.everySteps": 2, "data.eval": None})
    run_dir = tmp_path / "run"
    real_save = torch.save
    written: list[str] = []

    def save(obj, f, *args, **kwargs):  # the volume fills up during the second checkpoint
        if ".tmp-step-00000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        written.append(str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    message = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(message))
    run = train_job(job, run_dir)
    assert run.rc == 1
    reason = message.read_text()
    assert "checkpointing: cannot write step-00000004" in reason and "No space left on device" in reason
    assert "the previous checkpoint step-00000002 is intact" in reason and "\n" not in reason
    assert checkpoints.find_latest(run.checkpoint_dir).name == "step-00000002"
    assert run.steps() == [2] and not list(run.checkpoint_dir.glob(".tmp-*"))  # the partial write is gone
    _assert_intact(run.checkpoint_dir)

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes from step 2
    again = train_job(job, run_dir)
    assert again.rc == 0 and again.checkpoint_state(6)["step"] == 6
    assert [e["step"] for e in again.log()][-4:] == [3, 4, 5, 6]


class ReadOnlyVolume:
    """The checkpoint folder turns read-only (a remount after an I/O error, a claim mounted readOnly)
    at ``when``: from then on every call that would write under it fails with EROFS, as the kernel
    answers. The tests run as root, so chmod cannot show this; the os calls are patched instead."""

    def __init__(self, root, when: str) -> None:
        self.root, self.when, self.on = str(root), when, False

    def _under(self, path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(self.root)

    def _refuse(self, path) -> None:
        import errno

        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def install(self, monkeypatch) -> None:
        import builtins

        real = {"mkdir": os.mkdir, "rename": os.rename, "replace": os.replace, "open": builtins.open}

        def mkdir(path, *args, **kwargs):
            if self._under(path):
                self.on = self.on or (self.when == "start" and ".tmp-step-00000004" in os.fspath(path))
                if self.on:
                    self._refuse(path)
            return real["mkdir"](path, *args, **kwargs)

        def rename(src, dst, *args, **kwargs):
            if self._under(dst):
                self.on = self.on or (self.when == "rename" and ".tmp-step-00000004" in os.fspath(src))
                if self.on:
                    self._refuse(dst)
            return real["rename"](src, dst, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if self._under(dst) and self.on:
                self._refuse(dst)
            return real["replace"](src, dst, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and self._under(file) and self.on and set(mode) & set("wax+"):
                self._refuse(file)
            return real["open"](file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("when", ["start", "rename"])
def test_a_read_only_checkpoint_volume_fails_with_a_clear_reason_and_keeps_the_previous_checkpoint(
        tiny_model_dir, train_job, tmp_path, monkeypatch, when):
    """Read-only from the start of the second checkpoint, or only when it is renamed into place
    (after its files were written): either way one line says so and how to fix it, and the first
    checkpoint is still the latest, whole."""
    job = _text_job(tiny_model_dir, tmp_path, **{"training.maxSteps": 6, "checkpointing.everySteps": 2, "data.eval": None})
    run_dir = tmp_path / "run"
    volume = ReadOnlyVolume(run_dir / "checkpoints", when)
    message = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(message))
    with monkeypatch.context() as patched:
        volume.install(patched)
        run = train_job(job, run_dir)
    assert volume.on, "the volume never turned read-only: the test proved nothing"
    assert run.rc == 1
    reason = message.read_text()
    assert "checkpointing: cannot write step-00000004" in reason and "Read-only file system" in reason, reason
    assert "Mount the checkpoint volume read-write" in reason and "Free or enlarge" not in reason
    assert "the previous checkpoint step-00000002 is intact" in reason and "\n" not in reason
    assert checkpoints.find_latest(run.checkpoint_dir).name == "step-00000002"
    assert run.steps() == [2]
    _assert_intact(run.checkpoint_dir)
    again = train_job(job, run_dir)  # writable again: resumes from step 2
    assert again.rc == 0 and again.checkpoint_state(6)["step"] == 6
    assert [e["step"] for e in again.log()][-4:] == [3, 4, 5, 6]
