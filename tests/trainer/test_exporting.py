"""What lands in the output folder (spec.output): the model that loads back, the tokenizer unless
``saveTokenizer`` is off, the model card and manifest; the run's logs in the folder are kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.api import parse_job
from kubetune.trainer.exporting import export


@pytest.mark.parametrize("save_tokenizer", [True, False])
def test_the_export_holds_the_model_and_the_tokenizer_unless_turned_off(save_tokenizer: bool, tiny_model_dir,
                                                                         tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir("llama")
    job = parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "exported"},
                     "spec": {"model": {"source": str(source)}, "output": {"saveTokenizer": save_tokenizer},
                              "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]}}})
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    out = tmp_path / "output"
    (out / "tensorboard").mkdir(parents=True)
    (out / "trainer_log.jsonl").write_text("{}\n")
    export(model, tokenizer, out, job=job, rank=0, zero_stage=2, metrics={"eval_loss": 1.5})

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "kubetune.json", "tensorboard", "trainer_log.jsonl"} <= names
    assert ("tokenizer_config.json" in names) is save_tokenizer
    assert not any(name.startswith("tokenizer") for name in names) or save_tokenizer
    assert json.loads((out / "kubetune.json").read_text())["metadata"]["name"] == "exported"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
