"""Technique 14 · continual learning: start from an earlier job, replay its data, consolidate with EWC.

``techniques.continualLearning`` (:class:`kubetune.api.techniques.ContinualLearningSpec`):

* ``fromCheckpoint`` — the run starts from the weights of an earlier job instead of
  ``model.source``'s. :func:`load_start_weights` is called by ``kubetune.trainer.models.build_model``
  right after the model is built from ``model.source`` (architecture, head, PEFT wrapping), so every
  plugin's ``prepare_model`` already sees the earlier weights (L2-SP and EWC anchor to them). What it
  may point at (a path relative to the manifest's folder locally, ``pvc://claim/path`` or a path
  under ``/workspace`` in a cluster):

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
  new head starts fresh (a warning says so).
* ``replay`` — rows of the earlier task's data (``source`` read with its own ``format``, default
  the first dataset's; canonical column names) are mixed into the training examples so that they
  make up ``ratio`` of them, seeded by ``training.seed`` (every replay row is used once per full
  pass; a small replay set repeats). They are tagged ``_dataset``/``_task`` ``replay``. Only
  training data is mixed: to watch forgetting, list the earlier task's eval set under
  ``data.eval.datasets`` (per-task metrics follow).
* ``ewc`` — elastic weight consolidation (Kirkpatrick et al., 2017). At ``prepare_model`` the
  diagonal *empirical* Fisher information of the starting weights θ* is estimated as the mean
  squared per-example gradient of the loss on ``fisherSamples`` examples: of the replay data when
  ``replay`` is set (the earlier task, as EWC intends), else of this run's training data (an
  approximation: it measures which weights the current model relies on for the new inputs). Each
  loss then gets ``λ/2 · Σ F·(θ − θ*)²`` over the trainable parameters (only adapters under PEFT),
  recorded as ``ctx.loss_terms["ewc"]``. The Fisher is computed on the plain module before the
  DeepSpeed engine exists (ZeRO 0-2 keep the same parameter objects; ZeRO-3 is refused by the API),
  with the samples split across ranks and summed.

What happened is in ``ctx.state["continualLearning"]``: the resolved ``start`` and its ``kind``,
``replayExamples``, ``fisherData``/``fisherExamples``.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.engines import all_reduce
from kubetune.trainer.techniques.base import Technique, TechniqueContext, register

log = logging.getLogger("kubetune.trainer")

WHERE = "spec.techniques.continualLearning"
REPLAY = "replay"
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
# Adapter parameters of PEFT models: they have no counterpart in plain weights.
_ADAPTER_KEY = re.compile(r"(lora_|ia3_l|lora_magnitude|prompt_encoder|prefix_encoder|word_embeddings\.weight$)")


def _problem(message: str) -> Exception:
    from kubetune.api import Problem, SpecError

    return SpecError([Problem(f"{WHERE}.fromCheckpoint", message)])


# --- where the earlier weights are ---------------------------------------------------------------


def resolve_start(source: str, base_dir: Any) -> tuple[Path, str]:
    """The folder ``fromCheckpoint`` names and its kind: "adapter", "full" or "checkpoint"."""
    from kubetune.trainer import checkpoints
    from kubetune.trainer.sources import SourceError, resolve_path

    try:
        path = resolve_path(source, base_dir, f"{WHERE}.fromCheckpoint")
    except SourceError as exc:
        raise _problem(str(exc).split(": ", 1)[-1]) from exc
    if not path.exists():
        raise _problem(
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
    raise _problem(
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
        raise _problem(f"checkpoint {path} has no {STATE_TAG}/mp_rank_00_model_states.pt (DeepSpeed module state)")
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


def load_start_weights(model: Any, spec: Any, base_dir: Any, labels: list[str] | None = None) -> dict[str, Any]:
    """Put the weights of ``fromCheckpoint`` into ``model`` (built from ``model.source``); see the module doc.

    Returns what was done (also kept by the plugin in ``ctx.state``). Called by
    ``kubetune.trainer.models.build_model``.
    """
    path, kind = resolve_start(spec.techniques.continual_learning.from_checkpoint, base_dir)
    is_peft = hasattr(model, "peft_config")
    report: dict[str, Any] = {"start": str(path), "kind": kind}
    if kind == "adapter":
        import json

        adapter = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        _refuse_chained_adapter(path)
        earlier = str(adapter.get("peft_type", "")).lower()
        if is_peft:
            current = str(next(iter(model.peft_config.values())).peft_type.value).lower()
            if current != earlier:
                raise _problem(f"{path} holds a {earlier} adapter and this job trains {spec.peft.method} ({current}); use the same peft.method, or start from a merged output (output.mergeAdapters)")
            from peft import set_peft_model_state_dict

            weights = _read_weights(path)
            try:
                result = set_peft_model_state_dict(model, weights)
            except RuntimeError as exc:  # shapes differ: another r, other layers, other labels
                raise _problem(f"the adapter in {path} does not fit this job's adapter ({str(exc).splitlines()[-1].strip()}); use the earlier job's peft settings") from exc
            if getattr(result, "unexpected_keys", None):
                raise _problem(f"the adapter in {path} does not fit this job's adapter (unexpected {sorted(result.unexpected_keys)[:5]}); use the earlier job's peft settings")
            report["loaded"] = len(weights)
            return report
        source = _merged_adapter(path, spec, base_dir, labels)
    elif kind == "full":
        source = _read_weights(path)
    else:
        source = _read_checkpoint(path)
    report.update(_load_matching(model, source, path, spec, labels if kind != "checkpoint" else None, _labels_of(path)))
    return report


def _refuse_chained_adapter(path: Path) -> None:
    """An adapter applies to the weights it was trained on; refuse one trained on top of yet another job."""
    import json

    manifest = path / "kubetune.json"
    if not manifest.exists():
        return
    earlier = json.loads(manifest.read_text(encoding="utf-8")).get("spec", {})
    if ((earlier.get("techniques") or {}).get("continualLearning") or {}).get("fromCheckpoint"):
        raise _problem(
            f"the adapter in {path} was trained on the weights of yet another job "
            f"({earlier['techniques']['continualLearning']['fromCheckpoint']}), not on model.source; continue from a "
            "merged output (output.mergeAdapters in that job) instead"
        )


def _merged_adapter(path: Path, spec: Any, base_dir: Any, labels: list[str] | None) -> dict[str, torch.Tensor]:
    """Full weights of ``model.source`` + the adapter in ``path``, merged (for a full fine-tuning run)."""
    from peft import PeftModel

    from kubetune.trainer.models import load_pretrained, model_dir

    base = load_pretrained(model_dir(spec, base_dir), spec.head, labels=labels, trust_remote_code=spec.model.trust_remote_code)
    try:
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError) as exc:
        raise _problem(f"the adapter in {path} cannot be merged into model.source for full fine-tuning ({exc}); use the earlier job's peft.method") from exc
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
            raise _problem(
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
        raise _problem(f"{len(unused)} weights of {path} have no place in this model (e.g. {unused[:3]}); {hint}")
    pointers = {target[k].data_ptr() for k in loaded}
    missing = [
        k for k in target
        if k not in loaded and k not in skipped_head and not _ADAPTER_KEY.search(k) and target[k].data_ptr() not in pointers
        and k.endswith(("weight", "bias"))
    ]
    if missing:
        raise _problem(f"{path} has no weights for {len(missing)} parameters of model.source (e.g. {missing[:3]}); model.source must be the base model the earlier job trained")
    model.load_state_dict(loaded, strict=False)
    if skipped_head:
        log.warning("continualLearning: the task head starts fresh (%s: labels %s, earlier %s)", path, labels, earlier_labels)
    return {"loaded": len(loaded), "freshHead": bool(skipped_head)}


# --- replay ---------------------------------------------------------------------------------------


def replay_examples(spec: Any, base_dir: Any) -> list[dict[str, Any]]:
    """Every row of ``replay.source`` as an example of its format (tagged ``replay``)."""
    from kubetune.api.specs import DatasetSpec
    from kubetune.trainer.encoding import canonical_example
    from kubetune.trainer.reading import read_rows

    cfg = spec.techniques.continual_learning.replay
    fmt = cfg.format or spec.data.datasets[0].format
    ds = DatasetSpec.model_validate({"name": REPLAY, "source": cfg.source, "format": fmt})
    rows = read_rows(cfg.source, base_dir=base_dir, where=f"{WHERE}.replay.source")
    return [canonical_example(row, ds, REPLAY, REPLAY) for row in rows]


def replay_mix(replay: list[dict[str, Any]], n_new: int, ratio: float, seed: int) -> list[dict[str, Any]]:
    """Replay examples making up ``ratio`` of a mix with ``n_new`` new ones (whole shuffled passes, then a sample)."""
    if ratio <= 0.0 or not replay:
        return []
    wanted = round(n_new * ratio / (1.0 - ratio)) if ratio < 1.0 else n_new
    rng = random.Random(seed * 1009 + 14)
    picks: list[int] = []
    while len(picks) + len(replay) <= wanted:
        order = list(range(len(replay)))
        rng.shuffle(order)
        picks += order
    picks += rng.sample(range(len(replay)), wanted - len(picks))
    return [replay[i] for i in picks]


# --- EWC ------------------------------------------------------------------------------------------


def fisher_diagonal(model: Any, features: list[dict[str, Any]], collate: Any, device: Any, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of the loss, per trainable parameter (name → fp32 tensor).

    Examples are split across ranks and the sums all-reduced, so every rank gets the same Fisher.
    The model runs in eval mode (no dropout) and no ``.grad`` is touched.
    """
    from kubetune.trainer.batching import model_inputs

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for _, p in named]
    was_training = model.training
    model.eval()
    try:
        for item in features[rank::world_size]:
            outputs = model(**model_inputs(collate([item]), device))
            grads = torch.autograd.grad(outputs.loss, [p for _, p in named], allow_unused=True)
            for total, g in zip(sums, grads):
                if g is not None:
                    total.add_(g.detach().float().pow(2))
    finally:
        model.train(was_training)
    if world_size > 1 and torch.distributed.is_initialized():
        sums = [all_reduce(total) for total in sums]
    return {n: total / max(1, len(features)) for (n, _), total in zip(named, sums)}


def ewc_penalty(pairs: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]], lam: float) -> torch.Tensor:
    """``λ/2 · Σ F·(θ − θ*)²`` over (θ, θ*, F) triples."""
    return 0.5 * lam * torch.stack([(f * (p.float() - anchor).pow(2)).sum() for p, anchor, f in pairs]).sum()


@register
class ContinualLearning(Technique):
    """Replay mixing and the EWC penalty (the start weights load in ``build_model``; see the module doc)."""

    name = "continualLearning"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.replay: list[dict[str, Any]] = []
        self.anchors: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        if split != "train" or self.config.replay is None:
            return examples
        self.replay = replay_examples(self.spec, ctx.base_dir)
        mixed = replay_mix(self.replay, len(examples), self.config.replay.ratio, self.spec.training.seed)
        ctx.state.setdefault(self.name, {})["replayExamples"] = len(mixed)
        return examples + mixed

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        state = ctx.state.setdefault(self.name, {})
        if self.config.from_checkpoint:  # loaded by build_model already; recorded here for status and tests
            path, kind = resolve_start(self.config.from_checkpoint, ctx.base_dir)
            state.update(start=str(path), kind=kind)
        ewc = self.config.ewc
        if ewc is None:
            return model
        pool = self.replay or ctx.examples.get("train") or []
        state["fisherData"] = REPLAY if self.replay else "train"
        rng = random.Random(self.spec.training.seed * 7 + 14)
        chosen = rng.sample(range(len(pool)), min(ewc.fisher_samples, len(pool)))
        features = [{**ctx.encode(pool[i]), "_index": i, "_task": pool[i].get("_task", "")} for i in chosen]
        device = ctx.device or torch.device("cpu")
        first = next(model.parameters(), None)
        if first is not None and first.device != device and not getattr(model, "is_loaded_in_4bit", False):
            model.to(device)  # the engine would move it there anyway
        fisher = fisher_diagonal(model, features, ctx.collate, device, ctx.rank, ctx.world_size)
        params = dict(model.named_parameters())
        self.anchors = [(params[n], params[n].detach().float().clone(), f) for n, f in fisher.items()]
        state["fisherExamples"] = len(features)
        state["fisherTotal"] = float(sum(f.sum() for f in fisher.values()))
        return model

    def compute_loss(self, ctx: TechniqueContext, model: Any, batch: dict, outputs: Any, loss: Any) -> Any:
        live = [a for a in self.anchors if a[0].requires_grad]
        if self.config.ewc is None or not live:
            return loss
        term = ewc_penalty(live, self.config.ewc.lambda_)
        ctx.loss_terms["ewc"] = float(term.detach())
        return loss + term.to(loss.dtype)
