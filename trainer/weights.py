"""Weights of an earlier run, read in any form kubetune writes them, and put into a new model.

Used by a technique that starts from an earlier job (continual learning, through its
``start_weights`` hook); the formats are the trainer's own, so they are read here, in the core,
not in a plugin. What a source may be:

==========================  ==============================================================
an output folder            full weights (``*.safetensors``/``pytorch_model.bin`` with
                            ``config.json``) — loaded into the model, also under a new PEFT
                            adapter; or a PEFT adapter (``adapter_config.json``) — loaded into
                            this run's adapter of the same method, or merged into the base
                            for full fine-tuning
a checkpoint ``step-N/``    DeepSpeed's module state (ZeRO-3 shards are gathered to fp32);
                            the PEFT method must be the one the checkpoint was trained with
a checkpoints folder        its latest complete checkpoint
a local run folder          its ``output/`` (``runs/<name>`` of ``kubetune train``)
==========================  ==============================================================

``model.source`` stays the base: its tokenizer and architecture are used, so it must be the model
the earlier job trained. A task head is loaded when its shape and label names fit; otherwise the
new head starts fresh (a warning says so). Every problem is a :class:`kubetune.api.SpecError` on
the field the caller names.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("kubetune.trainer")

_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
# Adapter parameters of PEFT models: they have no counterpart in plain weights.
_ADAPTER_KEY = re.compile(r"(lora_|ia3_l|lora_magnitude|prompt_encoder|prefix_encoder|word_embeddings\.weight$)")


class WeightsError(Exception):
    """Why weights cannot be used (turned into a problem on the caller's field)."""


def _problem(where: str, message: str) -> Exception:
    from kubetune.api import Problem, SpecError

    return SpecError([Problem(where, message)])


def resolve_start(source: str, base_dir: Any, where: str) -> tuple[Path, str]:
    """The folder ``source`` names and its kind: "adapter", "full" or "checkpoint"; a problem names ``where``."""
    try:
        return _resolve(source, base_dir, where)
    except WeightsError as exc:
        raise _problem(where, str(exc)) from None


def _resolve(source: str, base_dir: Any, where: str) -> tuple[Path, str]:
    from kubetune.trainer import checkpoints
    from kubetune.trainer.sources import SourceError, resolve_path

    try:
        path = resolve_path(source, base_dir, where)
    except SourceError as exc:
        raise WeightsError(str(exc).split(": ", 1)[-1]) from exc
    if not path.exists():
        raise WeightsError(
            f"{path} does not exist (from {source!r}); name the output folder or a checkpoint (step-N) of the "
            "earlier job: locally a path relative to the manifest's folder (e.g. ../runs/<job>/output), in a "
            "cluster pvc://<claim>/output or a path under /workspace"
        )
    found = _kind(path)
    if found is not None:
        return path, found
    if (path / "output").is_dir() and _kind(path / "output") is not None:  # a local run folder
        return path / "output", _kind(path / "output")  # type: ignore[return-value]
    latest = checkpoints.find_latest(path)
    if latest is not None:
        return latest, "checkpoint"
    contents = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
    raise WeightsError(
        f"{path} (from {source!r}) is neither a model output (config.json with *.safetensors, or "
        "adapter_config.json) nor a checkpoint (step-N with trainer.json and state/) nor a folder of "
        f"checkpoints; it holds {contents}"
    )


def _kind(path: Path) -> str | None:
    if not path.is_dir():
        return None
    if (path / "adapter_config.json").exists():
        return "adapter"
    if (path / "config.json").exists() and any(any(path.glob(p)) for p in _WEIGHT_FILES):
        return "full"
    if (path / "trainer.json").exists() and (path / "state").is_dir():
        return "checkpoint"
    return None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        for f in sorted(path.glob("pytorch_model*.bin")):
            out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The module weights of a DeepSpeed checkpoint written by ``kubetune.trainer.checkpoints``."""
    from kubetune.trainer.checkpoints import STATE_TAG

    files = sorted((path / STATE_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise WeightsError(f"checkpoint {path} has no {STATE_TAG}/mp_rank_00_model_states.pt (DeepSpeed module state)")
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    if any(t.numel() == 0 for t in module.values()):  # ZeRO-3: the module file holds placeholders
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=STATE_TAG)
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _plain_key(key: str) -> str:
    """A state-dict key without DeepSpeed/PEFT wrapping, so plain and wrapped weights line up."""
    key = key.removeprefix("module.").removeprefix("base_model.model.")
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.(modules_to_save|original_module)(\.[A-Za-z0-9_]+)?\.", ".", key)


def _labels_of(path: Path) -> list[str] | None:
    import json

    config = path / "config.json"
    if not config.exists():
        return None
    id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else None


def load_start_weights(model: Any, source: str, spec: Any, base_dir: Any, labels: list[str] | None, where: str) -> dict[str, Any]:
    """Put the weights ``source`` names into ``model`` (built from ``model.source``); see the module doc.

    Returns what was done: ``start`` (the folder), ``kind``, ``loaded`` (tensors) and ``freshHead``.
    A problem is a :class:`~kubetune.api.SpecError` on ``where``.
    """
    try:
        return _load(model, source, spec, base_dir, labels, where)
    except WeightsError as exc:
        raise _problem(where, str(exc)) from None


def _load(model: Any, source: str, spec: Any, base_dir: Any, labels: list[str] | None, where: str) -> dict[str, Any]:
    path, kind = _resolve(source, base_dir, where)
    is_peft = hasattr(model, "peft_config")
    report: dict[str, Any] = {"start": str(path), "kind": kind}
    if kind == "adapter":
        import json

        adapter = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        earlier = str(adapter.get("peft_type", "")).lower()
        if is_peft:
            current = str(next(iter(model.peft_config.values())).peft_type.value).lower()
            if current != earlier:
                raise WeightsError(f"{path} holds a {earlier} adapter and this job trains {spec.peft.method} ({current}); use the same peft.method, or start from a merged output (output.mergeAdapters)")
            from peft import set_peft_model_state_dict

            weights = _read_weights(path)
            try:
                result = set_peft_model_state_dict(model, weights)
            except RuntimeError as exc:  # shapes differ: another r, other layers, other labels
                raise WeightsError(f"the adapter in {path} does not fit this job's adapter ({str(exc).splitlines()[-1].strip()}); use the earlier job's peft settings") from exc
            if getattr(result, "unexpected_keys", None):
                raise WeightsError(f"the adapter in {path} does not fit this job's adapter (unexpected {sorted(result.unexpected_keys)[:5]}); use the earlier job's peft settings")
            report["loaded"] = len(weights)
            return report
        source = _merged_adapter(path, spec, base_dir, labels)
    elif kind == "full":
        source = _read_weights(path)
    else:
        source = _read_checkpoint(path)
    report.update(_load_matching(model, source, path, spec, labels if kind != "checkpoint" else None, _labels_of(path)))
    return report


def _merged_adapter(path: Path, spec: Any, base_dir: Any, labels: list[str] | None) -> dict[str, torch.Tensor]:
    """Full weights of ``model.source`` + the adapter in ``path``, merged (for a full fine-tuning run)."""
    from peft import PeftModel

    from kubetune.trainer.models import load_pretrained, model_dir

    base = load_pretrained(model_dir(spec, base_dir), spec.head, labels=labels, trust_remote_code=spec.model.trust_remote_code)
    try:
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError) as exc:
        raise WeightsError(f"the adapter in {path} cannot be merged into model.source for full fine-tuning ({exc}); use the earlier job's peft.method") from exc
    return merged.state_dict()


def _load_matching(model: Any, source: dict[str, torch.Tensor], path: Path, spec: Any, labels: list[str] | None, earlier_labels: list[str] | None) -> dict[str, Any]:
    from kubetune.trainer.techniques.layers import anatomy

    by_plain = {_plain_key(k): k for k in source}
    head = {_plain_key(n) for n in anatomy(model).head}
    fresh_head = labels is not None and earlier_labels is not None and list(labels) != list(earlier_labels)
    target = model.state_dict()
    loaded, used, skipped_head = {}, set(), []
    for key, tensor in target.items():
        found = source.get(key)
        name = key if found is not None else by_plain.get(_plain_key(key))
        if name is None:
            continue
        value = source[name]
        if _plain_key(key) in head and (fresh_head or value.shape != tensor.shape):
            skipped_head.append(key)
            used.add(name)
            continue
        if value.shape != tensor.shape:
            raise WeightsError(
                f"{path}: {name} has shape {tuple(value.shape)}, model.source's {key} has {tuple(tensor.shape)}; "
                "model.source must be the base model the earlier job trained (and model.tokenizer its tokenizer)"
            )
        loaded[key] = value.to(dtype=tensor.dtype)
        used.add(name)
    unused = [k for k in source if k not in used]
    if unused:
        adapters = [k for k in unused if _ADAPTER_KEY.search(k)]
        hint = (
            f"it was trained with a PEFT adapter; use peft.method {spec.peft.method if adapters else ''} of the earlier job, or start from its output folder"
            if adapters else "model.source must be the base model the earlier job trained"
        )
        raise WeightsError(f"{len(unused)} weights of {path} have no place in this model (e.g. {unused[:3]}); {hint}")
    pointers = {target[k].data_ptr() for k in loaded}
    missing = [
        k for k in target
        if k not in loaded and k not in skipped_head and not _ADAPTER_KEY.search(k) and target[k].data_ptr() not in pointers
        and k.endswith(("weight", "bias"))
    ]
    if missing:
        raise WeightsError(f"{path} has no weights for {len(missing)} parameters of model.source (e.g. {missing[:3]}); model.source must be the base model the earlier job trained")
    model.load_state_dict(loaded, strict=False)
    if skipped_head:
        log.warning("the task head starts fresh (%s: labels %s, earlier %s)", path, labels, earlier_labels)
    return {"loaded": len(loaded), "freshHead": bool(skipped_head)}
