"""PEFT methods train only their own parameters and save an adapter that reloads (or a merged model)."""

from __future__ import annotations

import pytest
import torch
import transformers

from kubetune.api import parse_job
from tests.support.tiny_models import manifest, write_dataset

METHODS = [
    ({"method": "lora", "r": 4}, "lora"),
    ({"method": "dora", "r": 4}, "lora"),
    ({"method": "ia3"}, "ia3"),
    ({"method": "prefix", "numVirtualTokens": 4}, "prefix"),
    ({"method": "prompt", "numVirtualTokens": 4, "initText": "where does alice live"}, "prompt"),
    ({"method": "p-tuning", "numVirtualTokens": 4, "encoderHiddenSize": 32}, "p-tuning"),
]


@pytest.mark.parametrize(("peft", "kind"), METHODS, ids=[m["method"] for m, _ in METHODS])
def test_adapter_trains_and_reloads(peft, kind, tiny_model_dir, train_job, tmp_path):
    import peft as peft_lib

    data = write_dataset(tmp_path / "data.jsonl", "text", n=24)
    run = train_job(manifest(tiny_model_dir("llama"), data, "text", overrides={"peft": peft}), tmp_path / "run")
    assert run.rc == 0
    assert (run.output_dir / "adapter_model.safetensors").exists()
    assert not (run.output_dir / "model.safetensors").exists()
    model = peft_lib.AutoPeftModelForCausalLM.from_pretrained(str(run.output_dir))
    assert model.peft_config["default"].peft_type.value.lower().replace("_", "-") in {
        "lora": {"lora"}, "ia3": {"ia3"}, "prefix": {"prefix-tuning"}, "prompt": {"prompt-tuning"}, "p-tuning": {"p-tuning"},
    }[kind]
    if peft["method"] == "dora":
        assert model.peft_config["default"].use_dora
    sample = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=sample).logits).all()
    log = run.log()
    assert log[-1]["loss"] < log[0]["loss"]


def test_lora_merge_writes_a_plain_model(tiny_model_dir, train_job, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl", "text", n=24)
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={"peft": {"method": "lora", "r": 4}, "output.mergeAdapters": True})
    run = train_job(job, tmp_path / "run")
    assert run.rc == 0
    assert not (run.output_dir / "adapter_config.json").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(run.output_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])  # the adapter is folded in


def test_ia3_layers_restricts_training(tiny_model_dir, tmp_path):
    from kubetune.trainer.models import build_model, load_tokenizer

    data = write_dataset(tmp_path / "data.jsonl", "text", n=8)
    job = parse_job(manifest(tiny_model_dir("llama"), data, "text", overrides={"peft": {"method": "ia3", "layers": [1]}}))
    tokenizer, folder = load_tokenizer(job.spec, tmp_path)
    model = build_model(job.spec, tmp_path, tokenizer, folder, None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)


def test_prompt_tuning_starts_from_the_init_text(tiny_model_dir, tmp_path):
    from kubetune.trainer.models import build_model, load_tokenizer

    data = write_dataset(tmp_path / "data.jsonl", "text", n=8)
    text = "where does alice live"
    job = parse_job(manifest(tiny_model_dir("llama"), data, "text", overrides={"peft": {"method": "prompt", "numVirtualTokens": 4, "initText": text}}))
    tokenizer, folder = load_tokenizer(job.spec, tmp_path)
    model = build_model(job.spec, tmp_path, tokenizer, folder, None)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:4]
    virtual = model.prompt_encoder["default"].embedding.weight
    words = model.get_input_embeddings().weight[ids]
    assert torch.allclose(virtual, words)


def test_qlora_on_cpu_is_a_clear_error(tiny_model_dir, train_job, tmp_path, capsys):
    data = write_dataset(tmp_path / "data.jsonl", "text", n=8)
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={"peft": {"method": "qlora"}, "resources.gpusPerNode": 1})
    run = train_job(job, tmp_path / "run")
    assert run.rc == 2
    out = capsys.readouterr()
    assert "spec.peft.method: qlora" in out.out + out.err and "CUDA GPU" in out.out + out.err


def test_prefix_tuning_on_a_model_without_cache_is_a_clear_error(tiny_model_dir, train_job, tmp_path, capsys):
    data = write_dataset(tmp_path / "data.jsonl", "classification", n=8)
    job = manifest(tiny_model_dir("bert"), data, "classification", overrides={"peft": {"method": "prefix"}})
    run = train_job(job, tmp_path / "run")
    assert run.rc == 2
    out = capsys.readouterr()
    assert "spec.peft.method: prefix tuning" in out.out + out.err


@pytest.mark.parametrize(("targets", "wanted"), [
    (["q_proj", "v_proj"], lambda n: n.endswith((".q_proj", ".v_proj"))),  # names: PEFT's own matching, list unchanged
    ([r".*self_attn\.(q|k)_proj"], lambda n: n.endswith((".self_attn.q_proj", ".self_attn.k_proj"))),  # a whole-name regex
    ([r".*\.0\.self_attn\.q_proj", "mlp.down_proj"],  # mixed: the name stays a suffix match
     lambda n: n.endswith(".layers.0.self_attn.q_proj") or n.endswith(".mlp.down_proj")),
], ids=["names", "regex", "mixed"])
def test_target_modules_take_names_and_regular_expressions(targets, wanted, tiny_model_dir):
    """spec.peft.targetModules as documented: a name matches a module called that or ending in '.<name>';
    an entry with regex characters is a regular expression matched against the whole module name."""
    import peft as peft_lib

    from kubetune.api import parse_spec
    from kubetune.trainer.models import peft_config

    spec = parse_spec({"model": {"source": "m"}, "data": {"datasets": [{"name": "d", "source": "d.jsonl", "format": "text"}]},
                       "peft": {"method": "lora", "r": 4, "targetModules": targets}})
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    expected = {name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear) and wanted(name)}
    model = peft_lib.get_peft_model(base, peft_config(spec, tiny_model_dir("llama")))
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if isinstance(module, peft_lib.tuners.lora.LoraLayer)}
    assert expected and adapted == expected
