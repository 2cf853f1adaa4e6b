"""DeepSpeed ZeRO 1, 2 and 3 with two processes on CPU (gloo): loss goes down, resume continues."""

from __future__ import annotations

import pytest
import transformers

from tests.support.tiny_models import manifest, write_dataset


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_processes_train_and_resume(stage, tiny_model_dir, train_job, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl", "text", n=64)
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={
        "deepspeed.zeroStage": stage, "training.maxSteps": 6, "checkpointing.everySteps": 3,
        "training.gradientAccumulationSteps": 2 if stage == 2 else 1,
    })
    run_dir = tmp_path / "run"
    first = train_job(job, run_dir, nproc=2)
    assert first.rc == 0, first.output[-4000:]
    assert "2 processes" in first.output
    log = first.log()
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5  # it learns
    shards = list((run_dir / "checkpoints" / "step-00000006" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer shard per rank: ZeRO partitions the state

    second = train_job(job, run_dir, nproc=2, max_steps=10)
    assert second.rc == 0, second.output[-4000:]
    assert "resumed from" in second.output and "at step 6" in second.output
    # Same number of processes: DeepSpeed's own shards load as they are, nothing is converted.
    assert "resharded" not in second.output and not (run_dir / "checkpoints" / "step-00000006" / "universal").exists()
    log = second.log()
    assert [e["step"] for e in log] == list(range(1, 11))
    # The curve continues: the first step after the restart is near where it stopped, far from the start.
    assert abs(log[6]["loss"] - log[5]["loss"]) < abs(log[0]["loss"] - log[5]["loss"]) / 2
    assert second.checkpoint_state(10)["world_size"] == 2

    model = transformers.AutoModelForCausalLM.from_pretrained(str(second.output_dir))
    assert model.config.num_hidden_layers == 2


@pytest.mark.slow
def test_sigterm_checkpoints_every_rank_at_the_same_step(tiny_model_dir, train_job, tmp_path):
    import signal
    import time

    from kubetune.trainer import checkpoints
    from tests.trainer.test_checkpointing import _start, _wait_for_step

    data = write_dataset(tmp_path / "data.jsonl", "text", n=64)
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={
        "deepspeed.zeroStage": 2, "training.maxSteps": 400, "checkpointing.everySteps": 1000, "data.eval": None,
    })
    run_dir = tmp_path / "run"
    proc = _start(run_dir, job, nproc=2)
    signalled_at = _wait_for_step(proc, run_dir, 10)
    proc.send_signal(signal.SIGTERM)  # to `kubetune train`, which passes it on to torchrun and the ranks
    started = time.monotonic()
    proc.wait(timeout=60)
    assert time.monotonic() - started < 30
    latest = checkpoints.find_latest(run_dir / "checkpoints")
    assert latest is not None, proc.stdout.read().decode()[-4000:]
    assert signalled_at <= checkpoints.read_state(latest)["step"] < 400
    assert len(list((latest / "state").glob("*optim_states.pt"))) == 2  # both ranks saved

    again = train_job(job, run_dir, nproc=2, max_steps=checkpoints.read_state(latest)["step"] + 2)
    assert again.rc == 0, again.output[-4000:]
    assert f"resumed from {latest}" in again.output
