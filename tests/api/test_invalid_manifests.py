"""Each rule of the API refuses a bad manifest with the field path and what would be right."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.api import parse_job, parse_spec, validate_manifest
from kubetune.api.problems import SpecError

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"source": "hf://org/model"},
        "data": {"datasets": [{"source": "data/train.jsonl", "format": "text"}]},
    },
}


def _with(**patches: Any) -> dict[str, Any]:
    """BASE with dotted spec paths set (a value of None deletes the key)."""
    body = copy.deepcopy(BASE)
    for dotted, value in patches.items():
        node = body["spec"]
        *parents, leaf = dotted.split("__")
        for key in parents:
            if key.isdigit():
                node = node[int(key)]
            else:
                node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return body


CLASSIFY = {"task": {"type": "classification"}}
CLASSIFY_DATA = [{"source": "d.jsonl", "format": "classification"}]
PREF_DATA = [{"source": "p.jsonl", "format": "preference"}]

CASES = [
    # paths cannot escape their volume
    ("pvc path escaping its claim", _with(model={"source": "pvc://models/../../other-team/llama"}), "spec.model.source",
     "must not contain '..' segments: a pvc:// path stays inside its claim"),
    ("pkg path escaping its package", _with(data={"datasets": [{"source": "pkg://examples/../secrets", "format": "text"}]}),
     "spec.data.datasets[0].source", "must not contain '..' segments: a pkg:// path stays inside its package"),
    ("tokenizer escaping its claim", _with(model={"source": "hf://org/model", "tokenizer": "pvc://tok/a/../../b"}),
     "spec.model.tokenizer", "stays inside its claim"),
    ("absolute output path outside the workspace", _with(output={"path": "/etc/kubetune"}), "spec.output.path",
     "an absolute path escapes the workspace volume"),
    ("absolute output path, even under the workspace", _with(output={"path": "/workspace/../etc"}), "spec.output.path",
     "must be a relative path inside the job's workspace"),
    ("output path climbing out of the workspace", _with(output={"path": "models/../../other-job/output"}), "spec.output.path",
     "must not contain '..' segments: the output stays inside the job's workspace"),
    ("windows-style absolute output path", _with(output={"path": "C:\\models"}), "spec.output.path",
     "an absolute path escapes the workspace volume"),
    ("output path of '.' segments", _with(output={"path": "./"}), "spec.output.path", "must be a relative folder path such as"),
    # field-level checks
    ("rank below 1", _with(peft={"method": "lora", "r": -4}), "spec.peft.r", "must be >= 1 (got -4)"),
    ("unknown field with did-you-mean", _with(peft={"method": "lora", "alpah": 8}), "spec.peft.alpah", "did you mean 'alpha'?"),
    ("unknown technique with did-you-mean", _with(techniques={"curiculum": {}}), "spec.techniques.curiculum", "did you mean 'curriculum'?"),
    ("unknown top-level spec field", _with(trainig={}), "spec.trainig", "did you mean 'training'?"),
    ("enum", _with(peft={"method": "lorax"}), "spec.peft.method", "must be one of"),
    ("string where a number belongs", _with(training={"learningRate": "1e-4"}), "spec.training.learningRate", "must be a number"),
    ("bool where an integer belongs", _with(training={"maxSteps": True}), "spec.training.maxSteps", "must be an integer"),
    ("missing model", _with(model=None), "spec.model", "required"),
    ("empty dataset list", _with(data={"datasets": []}), "spec.data.datasets", "must not be empty"),
    ("bad dataset format", _with(data__datasets=[{"source": "d.jsonl", "format": "csv"}]), "spec.data.datasets[0].format", "must be one of"),
    ("bad model source", _with(model={"source": "ftp://x/y"}), "spec.model.source", "hf://org/name"),
    ("negative zero stage", _with(deepspeed={"zeroStage": 4}), "spec.deepspeed.zeroStage", "must be one of"),
    ("quantity", _with(resources={"memory": "lots"}), "spec.resources.memory", "must be a Kubernetes quantity: a number and an optional unit"),
    ("holdout above 1", _with(data__eval={"holdoutFraction": 1.5}), "spec.data.eval.holdoutFraction", "must be <= 1"),
    ("layer range syntax", _with(techniques={"layerSelection": {"layers": ["a-b"]}}), "spec.techniques.layerSelection.layers[0]", "must match"),
    # cross-field rules
    ("qlora needs gpus", _with(peft={"method": "qlora"}), "spec.peft.method", "needs GPUs"),
    ("dpo needs preference data", _with(techniques={"controlledGeneration": {"dpo": {}}}), "spec.techniques.controlledGeneration.dpo", "preference"),
    ("preference data needs dpo", _with(data__datasets=PREF_DATA), "spec.data.datasets[0].format", "dpo"),
    ("format must fit the head", _with(techniques=CLASSIFY), "spec.data.datasets[0].format", "does not fit the sequence-classification head"),
    ("prompt tuning cannot do token classification", _with(techniques={"task": {"type": "token-classification"}}, data__datasets=[{"source": "d.jsonl", "format": "token-classification"}], peft={"method": "prompt"}), "spec.peft.method", "token-classification"),
    ("early stopping needs eval data", _with(techniques={"earlyStopping": {}}), "spec.techniques.earlyStopping", "needs evaluation data"),
    ("linear probe with lora", _with(techniques={**CLASSIFY, "transferLearning": {"strategy": "linear-probe"}}, data__datasets=CLASSIFY_DATA, peft={"method": "lora"}), "spec.techniques.transferLearning.strategy", "peft.method full"),
    ("gradual unfreeze needs a schedule", _with(techniques={"transferLearning": {"strategy": "gradual-unfreeze"}}), "spec.techniques.transferLearning.unfreeze", "schedule"),
    ("packing is causal lm only", _with(techniques=CLASSIFY, data__datasets=CLASSIFY_DATA, training={"packing": True}), "spec.training.packing", "causal LM"),
    ("score curriculum needs a field", _with(techniques={"curriculum": {"difficulty": "score"}}), "spec.techniques.curriculum.scoreField", "column"),
    ("multi-task needs two datasets", _with(techniques={"multiTask": {}}), "spec.data.datasets", "at least two"),
    ("search path must exist", _with(techniques={"hyperparameterSearch": {"metric": "train_loss", "parameters": [{"path": "training.learningRat", "type": "float", "low": 1e-5, "high": 1e-3}]}}), "spec.techniques.hyperparameterSearch.parameters[0].path", "did you mean 'learningRate'"),
    ("search bounds ordered", _with(techniques={"hyperparameterSearch": {"metric": "train_loss", "parameters": [{"path": "training.learningRate", "type": "float", "low": 1e-3, "high": 1e-5}]}}), "spec.techniques.hyperparameterSearch.parameters[0].high", "must be > low"),
    ("fp8 needs gpus", _with(training={"precision": "fp8"}), "spec.training.precision", "fp8 needs GPUs with FP8 tensor cores"),
    ("fp8 is full fine-tuning only", _with(training={"precision": "fp8"}, resources={"gpusPerNode": 1}, peft={"method": "lora"}),
     "spec.training.precision", "fp8 is for full fine-tuning (peft.method full), not 'lora'"),
    ("fp8 with qlora", _with(training={"precision": "fp8"}, resources={"gpusPerNode": 1}, peft={"method": "qlora"}),
     "spec.training.precision", "not 'qlora'"),
    ("fp8 without zero 3", _with(training={"precision": "fp8"}, resources={"gpusPerNode": 1}, deepspeed={"zeroStage": 3}),
     "spec.deepspeed.zeroStage", "fp8 runs with ZeRO stages 0-2"),
    ("param offload needs zero 3", _with(deepspeed={"zeroStage": 2, "offloadParams": "cpu"}), "spec.deepspeed.offloadParams", "zeroStage 3"),
    ("multi-node needs RWX", _with(resources={"nodes": 2}), "spec.checkpointing.storage.accessMode", "ReadWriteMany"),
    ("merge needs an adapter", _with(output={"mergeAdapters": True}), "spec.output.mergeAdapters", "can be merged"),
    ("distillation and dpo", _with(data__datasets=PREF_DATA, techniques={"distillation": {"teacher": {"source": "hf://o/t"}}, "controlledGeneration": {"dpo": {}}}), "spec.techniques.distillation", "separate jobs"),
    ("duplicate dataset names", _with(data__datasets=[{"name": "a", "source": "a.jsonl", "format": "text"}, {"name": "a", "source": "b.jsonl", "format": "text"}]), "spec.data.datasets[1].name", "already"),
]


@pytest.mark.parametrize("body,path,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_manifest_names_the_field(body: dict, path: str, fragment: str) -> None:
    job, problems = validate_manifest(body)
    assert job is None
    by_path = {p.path: p.message for p in problems}
    assert path in by_path, f"expected a problem at {path}, got {by_path}"
    assert fragment in by_path[path], by_path[path]


def test_valid_base_passes() -> None:
    job = parse_job(BASE)
    assert job.spec.head == "causal-lm"
    assert job.spec.peft.method == "full"


def test_fp8_full_fine_tuning_on_gpus_passes() -> None:
    job = parse_job(_with(training={"precision": "fp8"}, resources={"gpusPerNode": 1}, deepspeed={"zeroStage": 2}))
    assert job.spec.training.precision == "fp8"


def test_unknown_precision_lists_fp8_among_the_allowed() -> None:
    _, problems = validate_manifest(_with(training={"precision": "float8"}))
    by_path = {p.path: p.message for p in problems}
    assert "fp8" in by_path["spec.training.precision"] and "bf16" in by_path["spec.training.precision"], by_path


def test_every_problem_is_reported_at_once() -> None:
    body = _with(peft={"method": "lora", "r": 0, "alpha": -1}, training={"epochs": 0})
    _, problems = validate_manifest(body)
    assert {p.path for p in problems} >= {"spec.peft.r", "spec.peft.alpha", "spec.training.epochs"}


def test_parse_spec_prefixes_paths_and_runs_rules() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE["spec"], "peft": {"method": "qlora"}})
    assert str(err.value).startswith("spec.peft.method: ")


def test_model_validate_applies_cross_field_rules() -> None:
    """The trainer may validate a spec directly; the cross-field rules still apply."""
    from pydantic import ValidationError

    from kubetune.api import FineTuneJobSpec

    with pytest.raises(ValidationError, match="needs GPUs"):
        FineTuneJobSpec.model_validate({**BASE["spec"], "peft": {"method": "qlora"}})


def test_kueue_label_wins_over_spec_queue() -> None:
    body = _with(resources={"queueName": "from-spec"})
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "from-label"}
    assert parse_job(body).queue_name == "from-label"
    assert parse_job(_with(resources={"queueName": "from-spec"})).queue_name == "from-spec"


def test_enabled_techniques_are_listed_in_registry_order() -> None:
    job = parse_job(
        _with(
            techniques={**CLASSIFY, "curriculum": {}, "regularization": {"weightDecay": 0.01}},
            data__datasets=CLASSIFY_DATA,
        )
    )
    assert job.spec.techniques.enabled() == ["task", "regularization", "curriculum"]


def test_unknown_field_without_near_miss_lists_what_is_allowed() -> None:
    _, problems = validate_manifest(_with(peft={"method": "lora", "rank": 8}))
    (problem,) = [p for p in problems if p.path == "spec.peft.rank"]
    assert "allowed: method, r, alpha" in problem.message


def test_packing_is_on_by_default_only_where_it_is_safe() -> None:
    """Unset packing: on for GPU causal-LM runs, off on CPU and wherever a technique needs the logits."""
    plain = parse_job(BASE).spec
    assert plain.training.packing is None
    assert plain.packing_enabled(on_gpu=True) and not plain.packing_enabled(on_gpu=False)
    off = {
        "classification head": _with(techniques=CLASSIFY, data__datasets=CLASSIFY_DATA),
        "prompt tuning": _with(peft={"method": "prompt"}),
        "distillation": _with(techniques={"distillation": {"teacher": {"source": "hf://o/t"}}}),
        "adversarial": _with(techniques={"adversarial": {"method": "fgm"}}),
        "label smoothing": _with(techniques={"regularization": {"labelSmoothing": 0.1}}),
        "dpo": _with(data__datasets=PREF_DATA, techniques={"controlledGeneration": {"dpo": {}}}),
    }
    for why, body in off.items():
        spec = parse_job(body).spec
        assert spec.packing_by_default() is not None, why
        assert not spec.packing_enabled(on_gpu=True), why
    # NEFTune alone keeps packing; an explicit choice always wins.
    assert parse_job(_with(techniques={"adversarial": {"method": "none", "neftuneAlpha": 5.0}})).spec.packing_enabled(on_gpu=True)
    assert not parse_job(_with(training={"packing": False})).spec.packing_enabled(on_gpu=True)
    assert parse_job(_with(training={"packing": True})).spec.packing_enabled(on_gpu=False)
