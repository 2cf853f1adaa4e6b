"""Technique 13 · early stopping: stops at the right step, says why in status, exports the best.

Two runs through the real loop (DeepSpeed on CPU), evaluating every 2 steps with patience 3:

* a plateau — a learning rate so small that no evaluation beats the first by ``minDelta`` — must
  stop at exactly step 2 + 3·2 = 8 and report ``early-stopped: …`` as the stop reason;
* a run that gets worse — the eval labels are the opposite of the training labels, so learning
  raises the eval loss — must stop three evaluations after its best one and export the weights of
  that best step (they are in its checkpoint), not those of the last step.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kubetune.api import SpecError
from tests.techniques.conftest import manifest, train
from tests.techniques.reviews import CLASSIFY, review_files



def _job(tiny_models, tmp_path, *, learning_rate, flip_eval=False, early=None):
    data = review_files(tmp_path, flip_eval=flip_eval)
    data["eval"]["everySteps"] = 2
    return manifest(
        tiny_models["encoder"], [], data=data,
        techniques={"task": CLASSIFY, "earlyStopping": early or {"patience": 3, "minDelta": 0.01}},
        training={"maxSteps": 40, "learningRate": learning_rate},
        checkpointing={"everySteps": 100000, "keepLast": 1},
    )


def test_a_plateau_stops_at_the_right_step_and_reports_why(tiny_models, tmp_path):
    t = train(_job(tiny_models, tmp_path, learning_rate=1e-9), tmp_path)
    assert t.step == 8  # best at the first evaluation (step 2), then 3 evaluations without improvement
    status = json.loads((tmp_path / "status.json").read_text())
    reason = status["progress"]["stopReason"]
    assert reason.startswith("early-stopped: eval_loss did not improve by more than 0.01 for 3 evaluations"), reason
    assert "at step 2" in reason
    [stopped] = [c for c in status["conditions"] if c["type"] == "EarlyStopped"]  # as the operator shows it
    assert (stopped["status"], stopped["reason"]) == ("True", "MetricPlateau")
    assert reason.removeprefix("early-stopped: ") in stopped["message"]
    assert status["phase"] == "Succeeded"


def test_the_best_checkpoint_is_exported_not_the_last(tiny_models, tmp_path):
    t = train(_job(tiny_models, tmp_path, learning_rate=5e-3, flip_eval=True), tmp_path)
    watched = t.ctx.state["earlyStopping"]
    best_step = watched["bestStep"]
    assert t.step == best_step + 3 * 2 < 40  # stopped 3 evaluations (of every 2 steps) after the best
    best = json.loads((tmp_path / "ckpt" / "best.json").read_text())
    assert best["step"] == best_step and best["value"] == pytest.approx(watched["best"])
    assert t.metrics["eval_loss"] >= best["value"] - 0.01  # the last evaluation did not improve on it
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))

    def weights(step):
        path = tmp_path / "ckpt" / f"step-{step:08d}" / "state" / "mp_rank_00_model_states.pt"
        return torch.load(path, weights_only=False)["module"]

    best_state, last_state = weights(best_step), weights(t.step)
    assert all(torch.equal(exported[k], best_state[k]) for k in exported)
    assert not all(torch.equal(exported[k], last_state[k]) for k in exported)


def test_mode_max_on_accuracy_and_a_metric_the_evaluation_does_not_report(tiny_models, tmp_path):
    doc = _job(tiny_models, tmp_path, learning_rate=1e-3, early={"metric": "eval_bleu", "mode": "max"})
    doc["spec"]["checkpointing"].update(metric="eval_bleu", mode="max")
    with pytest.raises(SpecError) as err:
        train(doc, tmp_path)
    [problem] = err.value.problems
    assert problem.path == "spec.techniques.earlyStopping.metric"
    assert "eval_accuracy" in problem.message and "eval_loss" in problem.message  # what it does report
