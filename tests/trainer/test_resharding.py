"""A checkpoint resumes on another number of processes: 1 → 2 and 2 → 1, ZeRO 1/2/3, full and LoRA.

Each case trains the job uninterrupted on one process (9 steps, checkpointing every 3), the
reference. Its step-3 checkpoint is resumed on two processes (1 → 2), which train on to step 9 and
checkpoint at step 6 themselves; that two-process checkpoint is resumed on one process (2 → 1).
Both keep the global batch of 8 (micro-batch 4 × accumulation 2 × 1, and 4 × 1 × 2), and each
resumed run's steps must be the uninterrupted run's. One two-process start serves both directions:
the step-6 checkpoint it writes is DeepSpeed's own two-rank one, as a run begun on two processes
writes it. The tolerance: with dropout 0, fp32 and the same global batch, the two sizes differ only
in the order gradients are summed (an all-reduce of two ranks against accumulating two micro-batches
in one process), about 1e-7 relative per step; a skipped or repeated micro-batch, a lost optimizer
moment or a reset schedule moves the loss by far more than 1e-4 (the loss falls by ~2-10% a step
here). Dropout is 0 (LoRA's own included): per-rank random generators cannot map across counts, and
with LoRA dropout 0.05 the first step after a 2 → 1 resume differs by ~1e-3 relative, the size of
two different dropout masks. Full fine-tuning runs with weight decay, so the optimizer has two
groups (decay, and none for norms) whose settings must both come back.
"""

from __future__ import annotations

import shutil

import pytest

from kubetune.trainer import resharding
from kubetune.trainer.batching import epoch_order, micro_batches, shard
from tests.support.tiny_models import manifest, write_dataset

CASES = [(1, "none"), (2, "none"), (3, "none"), (2, "lora"), (3, "lora")]
TOLERANCE = 1e-4


def _job(model, data, stage, peft, accumulation):
    overrides = {
        "deepspeed.zeroStage": stage, "training.maxSteps": 9, "checkpointing.everySteps": 3,
        "checkpointing.keepLast": 5, "data.eval": None, "training.gradientAccumulationSteps": accumulation,
    }
    if peft != "none":
        overrides["peft"] = {"method": peft, "dropout": 0.0}  # no random masks: see the module doc
    else:  # two optimizer groups (norms without decay): each must get its own settings back
        overrides["techniques.regularization"] = {"weightDecay": 1.0}
    return manifest(model, data, "text", overrides=overrides)


def _from_checkpoint(source, step, run_dir):
    """A run folder holding only ``source``'s checkpoint of ``step`` (as a restarted pod finds it)."""
    name = f"step-{step:08d}"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source.checkpoint_dir / name, run_dir / "checkpoints" / name)
    (run_dir / "checkpoints" / "latest").write_text(name + "\n")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("stage,peft", CASES, ids=[f"zero{s}-{p}" for s, p in CASES])
def test_checkpoint_resumes_on_another_process_count(stage, peft, tiny_model_dir, train_job, tmp_path):
    model = tiny_model_dir("llama")
    data = write_dataset(tmp_path / "data.jsonl", "text", n=64)  # 8 steps an epoch: step 9 begins the next
    job = _job(model, data, stage, peft, 2)
    one = train_job(job, tmp_path / "one")
    assert one.rc == 0
    reference = {e["step"]: e for e in one.log()}
    assert sorted(reference) == list(range(1, 10))

    # 1 → 2: the manifest says accumulation 2; two processes keep the global batch 8 with 4 × 1 × 2.
    to_two = train_job(job, _from_checkpoint(one, 3, tmp_path / "one-to-two"), nproc=2)
    assert to_two.rc == 0, to_two.output[-4000:]
    assert "resharded from 1 to 2 processes" in to_two.output
    assert "converted step-00000003 to a universal checkpoint in " in to_two.output  # the log line operations.md quotes
    assert (to_two.checkpoint_dir / "step-00000006" / "state").is_dir()
    # 2 → 1: the two-process run's step-6 checkpoint (DeepSpeed's two-rank shards, taken with 4 × 1 × 2)
    # on one process keeps the global batch 8.
    to_one = train_job(job, _from_checkpoint(to_two, 6, tmp_path / "two-to-one"))
    for resumed, at, after in ((to_two, 3, 2), (to_one, 6, 1)):
        assert resumed.rc == 0, resumed.output[-4000:]
        assert (resumed.checkpoint_dir / f"step-{at:08d}" / "universal" / "zero").is_dir()
        log = resumed.log()
        after_resume = list(range(at + 1, 10))
        assert [e["step"] for e in log] == after_resume
        # The first step after the resume is the uninterrupted run's, and so are the next ones.
        assert log[0]["loss"] == pytest.approx(reference[at + 1]["loss"], rel=TOLERANCE)
        assert [e["loss"] for e in log] == pytest.approx([reference[s]["loss"] for s in after_resume], rel=TOLERANCE)
        assert [e["learning_rate"] for e in log] == pytest.approx([reference[s]["learning_rate"] for s in after_resume])
        state = resumed.checkpoint_state(9)
        assert state["world_size"] == after
        assert state["micro_batch_size"] * state["gradient_accumulation_steps"] * after == 8
    assert to_two.checkpoint_state(6)["world_size"] == 2  # what the 2 → 1 resume started from
    # Without the optimizer state the step after the resume would differ: the checkpoint really moved it.
    assert abs(reference[4]["loss"] - reference[3]["loss"]) > 100 * TOLERANCE * reference[4]["loss"]

    if stage == 1:  # once: a count that cannot keep the global batch fails the job at once, in one line
        import json

        odd = _from_checkpoint(one, 3, tmp_path / "three-to-two")
        state_file = odd / "checkpoints" / "step-00000003" / "trainer.json"
        state = json.loads(state_file.read_text())
        state.update(world_size=3, micro_batch_size=1, gradient_accumulation_steps=1)  # as if taken on 3 processes
        state_file.write_text(json.dumps(state))
        refused = train_job(job, odd, nproc=2)
        assert refused.rc == 2, refused.output[-4000:]
        assert ("spec.resources: checkpoint step-00000003 was trained on 3 processes with a global batch of 3 "
                "(micro-batch 1 × accumulation 1 × 3); 2 processes cannot keep it (3 is not a multiple of 2)") in refused.output
        assert "Traceback" not in refused.output


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2), (2, 4), (1, 4)])
@pytest.mark.parametrize("n", [64, 61])
def test_data_position_maps_by_global_examples_consumed(before, after, n):
    """The examples read before the checkpoint (on ``before`` ranks) and after it (on ``after``)
    are the epoch's order, each once: none skipped, none repeated."""

    class Spec:
        class training:  # noqa: N801 - the shape of spec.training
            micro_batch_size = 2
            gradient_accumulation_steps = 4 // before
            packing = False

    order = epoch_order(n, 0, seed=3, shuffle=True, hooked=None)
    offset = 3 * Spec.training.gradient_accumulation_steps  # a checkpoint at step 3
    state = {"world_size": before, "micro_batch_size": 2, "gradient_accumulation_steps": 4 // before}
    micro, accum = resharding.plan_batch(state, Spec, after)
    assert micro * accum * after == 8
    read = [i for r in range(before) for b in micro_batches(shard(order, r, before), 2)[:offset] for i in b]
    new_offset = resharding.map_offset(offset, state, Spec, after, micro)
    rest = [i for r in range(after) for b in micro_batches(shard(order, r, after), micro)[new_offset:] for i in b]
    assert len(read) == 3 * 8 and sorted(read) == sorted(order[:24])  # the first 3 global batches
    # Afterwards exactly the others, plus the wrap-around padding that evens out the ranks' last round.
    pad = order[: -n % after]
    assert sorted(rest) == sorted(order[24:] + pad)


class _Spec:
    def __init__(self, micro, accum, packing=False):
        class training:  # noqa: N801
            pass

        training.micro_batch_size, training.gradient_accumulation_steps, training.packing = micro, accum, packing
        self.training = training


def test_global_batch_is_kept_or_the_new_count_is_refused_in_one_line():
    state = {"world_size": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 1}
    assert resharding.plan_batch(state, _Spec(4, 1), 2) == (4, 1)  # same count: the checkpoint's shape
    assert resharding.plan_batch(state, _Spec(4, 1), 1) == (4, 2)
    assert resharding.plan_batch(state, _Spec(4, 1), 4) == (2, 1)  # the micro-batch shrinks, never grows
    assert resharding.plan_batch(state, _Spec(4, 1), 8) == (1, 1)
    # A resumed run keeps the shape it was resumed with, whatever the manifest's accumulation says.
    assert resharding.plan_batch({"world_size": 1, "micro_batch_size": 4, "gradient_accumulation_steps": 2}, _Spec(4, 1), 1) == (4, 2)
    with pytest.raises(resharding.ReshardError) as refused:
        resharding.plan_batch(state, _Spec(4, 1), 3)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("spec.resources: the checkpoint was trained on 2 processes with a global batch of 8")
    assert "8 is not a multiple of 3" in message and "checkpointing.resume: false" in message
    with pytest.raises(resharding.ReshardError, match="with training.packing the micro-batch"):
        resharding.plan_batch(state, _Spec(4, 1, packing=True), 4)
    assert resharding.plan_batch(state, _Spec(4, 1, packing=True), 1) == (4, 2)
    # Checkpoints of older versions record only the world size: the spec's shape was theirs.
    assert resharding.plan_batch({"world_size": 2}, _Spec(2, 2), 1) == (2, 4)


@pytest.mark.slow
def test_a_fused_engine_checkpoint_resumes_on_two_processes_without_conversion(tiny_model_dir, train_job, tmp_path):
    """One GPU runs the fused engine (here asked for by name, as CPU runs default to DeepSpeed); the run
    moved to two processes goes on with DeepSpeed ZeRO-2 from the fused checkpoint, which is keyed by
    parameter name and so needs no universal conversion: the curve is the uninterrupted one."""
    model = tiny_model_dir("llama")
    data = write_dataset(tmp_path / "data.jsonl", "text", n=64)
    fused, moved = _job(model, data, 2, "none", 2), _job(model, data, 2, "none", 2)
    fused["spec"]["deepspeed"]["engine"] = "fused"  # the same run otherwise: the engine is not fingerprinted
    one = train_job(fused, tmp_path / "one")
    assert one.rc == 0, one.output[-4000:]
    assert (one.checkpoint_dir / "step-00000003" / "state" / "fused_optim_states.pt").exists()
    resumed = train_job(moved, _from_checkpoint(one, 3, tmp_path / "to-two"), nproc=2)
    assert resumed.rc == 0, resumed.output[-4000:]
    assert "resharded from 1 to 2 processes" in resumed.output
    assert not (resumed.checkpoint_dir / "step-00000003" / "universal").exists()
    log, reference = resumed.log(), {e["step"]: e for e in one.log()}
    assert [e["step"] for e in log] == list(range(4, 10))
    assert [e["loss"] for e in log] == pytest.approx([reference[s]["loss"] for s in range(4, 10)], rel=TOLERANCE)
