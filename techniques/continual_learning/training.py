"""Technique 14 · continual learning: start from an earlier job, replay its data, consolidate with EWC.

``techniques.continualLearning`` (:class:`kubetune.techniques.continual_learning.ContinualLearningSpec`):

* ``fromCheckpoint`` — the run starts from the weights of an earlier job instead of
  ``model.source``'s: the ``start_weights`` hook loads them (``kubetune.trainer.weights``, which
  reads every form the trainer writes) right after the model is built from ``model.source``
  (architecture, head, PEFT wrapping), so every plugin's ``prepare_model`` already sees the earlier
  weights (L2-SP and EWC anchor to them). An adapter trained on top of yet another job's weights is
  refused. It may point at an output folder (full weights or a PEFT adapter), a checkpoint
  ``step-N/``, a checkpoints folder (its latest complete checkpoint) or a local run folder; the
  table of what each gives, and the rules for heads and the base model, are in
  :mod:`kubetune.trainer.weights`. A path is relative to the manifest's folder locally,
  ``pvc://claim/path`` or a path under ``/workspace`` in a cluster.
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
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.distributing import all_reduce
from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.weights import load_start_weights, resolve_start

log = logging.getLogger("kubetune.trainer")

WHERE = "spec.techniques.continualLearning"
REPLAY = "replay"


def _problem(message: str) -> Exception:
    from kubetune.api import Problem, SpecError

    return SpecError([Problem(f"{WHERE}.fromCheckpoint", message)])


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

    def start_weights(self, ctx: TechniqueContext, model: Any) -> None:
        if not self.config.from_checkpoint:
            return
        where = f"{WHERE}.fromCheckpoint"
        path, kind = resolve_start(self.config.from_checkpoint, ctx.base_dir, where)
        if kind == "adapter":
            _refuse_chained_adapter(path)
        report = load_start_weights(model, self.config.from_checkpoint, self.spec, ctx.base_dir, ctx.labels, where)
        ctx.state.setdefault(self.name, {}).update(report)

    def prepare_model(self, ctx: TechniqueContext, model: Any) -> Any:
        state = ctx.state.setdefault(self.name, {})
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

    def describe(self, ctx: TechniqueContext) -> str | None:
        state = ctx.state.get(self.name, {})
        parts = []
        if "start" in state:
            parts.append(f"started from {state['start']} ({state['kind']})")
        if "replayExamples" in state:
            total = len(ctx.examples.get("train") or []) or 1
            parts.append(f"replay share {state['replayExamples'] / total:.0%} ({state['replayExamples']} examples)")
        if "ewc" in ctx.loss_terms:
            parts.append(f"last EWC penalty {ctx.loss_terms['ewc']:.4g}")
        return "; ".join(parts) or None
