"""The API refuses Techniques II combinations that cannot work, naming the field and the fix."""

from __future__ import annotations

import pytest

from kubetune.api import validate_manifest

BASE = {"model": {"source": "hf://org/model"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]}}


def _problems(**spec):
    body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"}, "spec": {**BASE, **spec}}
    _, problems = validate_manifest(body)
    return {p.path: p.message for p in problems}


@pytest.mark.parametrize(("spec", "path", "words"), [
    ({"data": {**BASE["data"], "eval": {"holdoutFraction": 0.2}}, "techniques": {"earlyStopping": {"metric": "eval_perplexity"}}},
     "spec.checkpointing.metric", "set checkpointing.metric: eval_perplexity"),
    ({"training": {"packing": True}, "techniques": {"distillation": {"teacher": {"source": "hf://o/t"}}}}, "spec.training.packing", "turn packing off"),
    ({"training": {"packing": True}, "techniques": {"adversarial": {"method": "fgm"}}}, "spec.training.packing", "NEFTune alone works"),
    ({"deepspeed": {"zeroStage": 3}, "techniques": {"regularization": {"l2Sp": 0.1}}}, "spec.techniques.regularization.l2Sp", "zeroStage 0-2"),
    ({"techniques": {"adversarial": {"method": "none"}}}, "spec.techniques.adversarial.method", "changes nothing"),
])
def test_refused_with_path_and_fix(spec, path, words):
    problems = _problems(**spec)
    assert path in problems, problems
    assert words in problems[path]


def test_allowed_combinations_pass():
    assert _problems(training={"packing": True}, techniques={"adversarial": {"method": "none", "neftuneAlpha": 5.0}}) == {}
