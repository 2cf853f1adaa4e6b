"""The DeepSpeed config derived from a spec, and the escape hatch merged over it."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune.trainer.engines import deep_merge, deepspeed_config


def _spec(**blocks):
    return parse_spec({"model": {"source": "m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]}, **blocks})


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_batch_sizes(stage):
    spec = _spec(training={"microBatchSize": 4, "gradientAccumulationSteps": 3, "maxGradNorm": 0.5}, deepspeed={"zeroStage": stage})
    config = deepspeed_config(spec, world_size=2, precision="fp32")
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 0.5
    assert "bf16" not in config and "fp16" not in config


def test_offload_and_precision():
    spec = _spec(deepspeed={"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParams": "cpu"}, resources={"gpusPerNode": 1}, training={"precision": "bf16"})
    config = deepspeed_config(spec, world_size=1, precision="bf16")
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["bf16"] == {"enabled": True}
    assert deepspeed_config(spec, 1, "fp16")["fp16"]["enabled"] is True


def test_no_clipping_when_max_grad_norm_is_null():
    assert "gradient_clipping" not in deepspeed_config(_spec(training={"maxGradNorm": None}), 1, "fp32")


def test_escape_hatch_deep_merges_but_batch_sizes_follow_training():
    spec = _spec(
        training={"microBatchSize": 2},
        deepspeed={"zeroStage": 2, "config": {"zero_optimization": {"overlap_comm": True}, "train_micro_batch_size_per_gpu": 99, "comms_logger": {"enabled": True}}},
    )
    config = deepspeed_config(spec, 1, "fp32")
    # one process: overlap and contiguous buffers are off by default, and the escape hatch still wins
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": False}
    assert config["comms_logger"] == {"enabled": True}
    assert config["train_micro_batch_size_per_gpu"] == 2


def test_one_process_turns_off_zero_overlap_and_several_keep_deepspeed_defaults():
    spec = _spec(deepspeed={"zeroStage": 2})
    assert deepspeed_config(spec, 1, "bf16")["zero_optimization"] == {
        "stage": 2, "overlap_comm": False, "contiguous_gradients": False}
    assert deepspeed_config(spec, 2, "bf16")["zero_optimization"] == {"stage": 2}
    assert deepspeed_config(_spec(deepspeed={"zeroStage": 3}), 1, "bf16")["zero_optimization"]["stage"] == 3
    assert "overlap_comm" not in deepspeed_config(_spec(deepspeed={"zeroStage": 3}), 1, "bf16")["zero_optimization"]


def test_deep_merge_does_not_modify_its_inputs():
    base = {"a": {"b": 1, "c": 2}}
    merged = deep_merge(base, {"a": {"b": 5}, "d": [1]})
    assert merged == {"a": {"b": 5, "c": 2}, "d": [1]}
    assert base == {"a": {"b": 1, "c": 2}}
