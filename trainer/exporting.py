"""Writing the final model: weights or adapter as safetensors, optional merge, tokenizer, model card.

Called by the training loop (``kubetune.trainer.training``) once training ends (every rank calls
:func:`export`, rank 0 writes). What lands in the output directory:

* full fine-tuning: the model (``model.safetensors`` + ``config.json``), loadable with the
  ``AutoModelFor…`` class of the head;
* PEFT: the adapter (``adapter_model.safetensors`` + ``adapter_config.json``), loadable with
  ``peft.AutoPeftModelFor…``; with ``output.mergeAdapters`` (lora, dora, ia3) the adapter is merged
  into the base and a plain model is written instead;
* the tokenizer (unless ``output.saveTokenizer`` is off);
* ``README.md``: a model card recording the base model, head, method, techniques, the final metrics
  and the manifest the model was trained from; ``kubetune.json``: the same manifest as JSON.

Under ZeRO-3 the parameters are sharded, so every rank joins a gather and rank 0 writes from the
gathered state dict (for a merge it rebuilds the model on CPU through ``rebuild``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml


def _gathered_state_dict(model: torch.nn.Module, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    if zero_stage != 3:
        return None
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return state


def export(
    model: torch.nn.Module,
    tokenizer: Any,
    output_dir: Path,
    *,
    job: Any,
    rank: int,
    zero_stage: int,
    metrics: dict[str, float],
    rebuild: Callable[[], torch.nn.Module] | None = None,
) -> Path:
    """Write the final model to ``output_dir`` (see the module doc); returns it."""
    spec = job.spec
    state = _gathered_state_dict(model, zero_stage, rank)
    if rank != 0:
        return output_dir
    staging = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    is_peft = spec.peft.method != "full"
    if is_peft and spec.output.merge_adapters:
        target = model
        if state is not None:
            if rebuild is None:
                raise RuntimeError("merging adapters under ZeRO-3 needs a way to rebuild the model on CPU")
            target = rebuild()
            target.load_state_dict(state, strict=False)
        merged = target.merge_and_unload()
        merged.save_pretrained(str(staging), safe_serialization=True)
    elif state is not None:
        model.save_pretrained(str(staging), state_dict=state, safe_serialization=True)
    else:
        model.save_pretrained(str(staging), safe_serialization=True)
    if spec.output.save_tokenizer and tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    manifest = job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    (staging / "kubetune.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    (staging / "README.md").write_text(model_card(job, manifest, metrics), encoding="utf-8")
    # Move the finished files in; other entries of the output folder (tensorboard/,
    # trainer_log.jsonl) stay. Weights of an earlier export that this one does not write are
    # removed so the folder never mixes two exports.
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*output_dir.glob("*.safetensors"), *output_dir.glob("*.safetensors.index.json"), output_dir / "adapter_config.json"]:
        if stale.exists() and not (staging / stale.name).exists():
            stale.unlink()
    for entry in staging.iterdir():
        target = output_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    return output_dir


_LOADERS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "question-answering": "AutoModelForQuestionAnswering",
}


def model_card(job: Any, manifest: dict[str, Any], metrics: dict[str, float]) -> str:
    """The README.md of the output folder."""
    spec = job.spec
    techniques = ", ".join(spec.techniques.enabled()) or "none"
    adapter = spec.peft.method != "full" and not spec.output.merge_adapters
    loader = _LOADERS[spec.head]
    load = (
        f"from peft import AutoPeft{loader[4:]}\nmodel = AutoPeft{loader[4:]}.from_pretrained(\"<this folder>\")"
        if adapter
        else f"from transformers import {loader}\nmodel = {loader}.from_pretrained(\"<this folder>\")"
    )
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| (no evaluation data) | |"
    return f"""---
library_name: {"peft" if adapter else "transformers"}
base_model: {spec.model.source}
tags: [kubetune, {spec.head}, {spec.peft.method}]
---
# {job.name}

Fine-tuned with [kubetune](https://github.com/kubetune/kubetune) from `{spec.model.source}`.

- head: {spec.head}
- method: {spec.peft.method}{" (merged into the base)" if spec.peft.method != "full" and spec.output.merge_adapters else ""}
- techniques: {techniques}
- datasets: {", ".join(d.source for d in spec.data.datasets)}

## Final evaluation

| metric | value |
|---|---|
{rows}

## Load it

```python
{load}
```

## The manifest it was trained from

```yaml
{yaml.safe_dump(manifest, sort_keys=False).rstrip()}
```
"""
