"""Hyperparameter search: which spec fields a search may tune, the samplers that propose trial
values (grid, random, TPE), and how a trial's values are written into a copy of the spec.

A path is dotted camelCase under ``spec`` (``training.learningRate``, ``peft.r``). It must name a
scalar field; the trial's spec is re-validated, so a value out of a field's bounds is caught.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import random
from typing import Any, get_args, get_origin

import yaml

from pydantic import BaseModel

from kubetune.techniques.hyperparameter_search import HyperparameterSearchSpec, SearchParameter


def _unwrap(annotation: Any) -> Any:
    """X | None -> X."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and len(args) == 1 and str(get_origin(annotation)) in {"typing.Union", "<class 'types.UnionType'>"}:
        return args[0]
    return annotation


def _field_by_alias(model: type[BaseModel], key: str) -> tuple[str, Any] | None:
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return name, info
    return None


def resolve_search_path(path: str) -> str | None:
    """None when ``path`` names a tunable scalar field of the spec, else what is wrong."""
    from kubetune.api.specs import FineTuneJobSpec

    model: Any = FineTuneJobSpec
    parts = path.split(".")
    for i, key in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"{'.'.join(parts[:i])} is not a block with fields"
        found = _field_by_alias(model, key)
        if found is None:
            names = [info.alias or n for n, info in model.model_fields.items()]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; fields here: {', '.join(names)}"
            return f"no field {key!r} in {'.'.join(parts[:i]) or 'spec'}{hint}"
        model = _unwrap(found[1].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return f"{path} is a block; name one of its scalar fields"
    if path.split(".")[0] in {"model", "data", "resources", "checkpointing", "output", "runPolicy"}:
        return f"{path} is not a training hyperparameter; tune training, peft, deepspeed or techniques fields"
    return None


def apply_trial(spec: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a spec manifest with each dotted path set to its trial value."""
    out = copy.deepcopy(spec)
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


# --- samplers ---------------------------------------------------------------------------------
# Pure Python and deterministic for a seed, so that the operator (trials as child FineTuneJobs)
# and `kubetune train` (trials one after another) propose the very same trials.



def choice_value(text: str) -> Any:
    """A categorical choice as the YAML scalar it spells (`cosine`, `true` -> True, `8` -> 8)."""
    return yaml.safe_load(text) if text.strip() else text


def grid_points(space: list[SearchParameter]) -> list[dict[str, Any]]:
    """Every combination of a grid search, in a stable order."""
    axes: list[list[Any]] = []
    for p in space:
        if p.type == "categorical":
            axes.append([choice_value(c) for c in p.choices or []])
        elif p.values:
            axes.append([int(v) if p.type == "int" else float(v) for v in p.values])
        elif p.type == "int" and p.low is not None and p.high is not None:
            axes.append(list(range(int(p.low), int(p.high) + 1)))
        else:  # rules.py refuses float grids without values
            raise ValueError(f"{p.path}: grid search needs values")
    return [dict(zip([p.path for p in space], combo)) for combo in itertools.product(*axes)]


def _sample_uniform(p: SearchParameter, rng: random.Random) -> Any:
    if p.type == "categorical":
        return choice_value(rng.choice(p.choices or [""]))
    if p.values:
        return int(rng.choice(p.values)) if p.type == "int" else float(rng.choice(p.values))
    low, high = float(p.low), float(p.high)  # type: ignore[arg-type]
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if p.log else rng.uniform(low, high)
    return int(round(x)) if p.type == "int" else x


def _to_unit(p: SearchParameter, x: float) -> float:
    low, high = float(p.low), float(p.high)  # type: ignore[arg-type]
    if p.log:
        return (math.log(x) - math.log(low)) / (math.log(high) - math.log(low))
    return (x - low) / (high - low)


def _from_unit(p: SearchParameter, u: float) -> Any:
    low, high = float(p.low), float(p.high)  # type: ignore[arg-type]
    u = min(1.0, max(0.0, u))
    x = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if p.log else low + u * (high - low)
    return int(round(x)) if p.type == "int" else x


def _parzen(points: list[float], x: float, bandwidth: float) -> float:
    # A Gaussian mixture over observed points plus a flat prior component (keeps exploring).
    total = 1.0  # the prior: uniform density 1 on [0, 1]
    for c in points:
        total += math.exp(-0.5 * ((x - c) / bandwidth) ** 2) / (bandwidth * math.sqrt(2 * math.pi))
    return total / (len(points) + 1)


def _tpe_one(p: SearchParameter, good: list[Any], bad: list[Any], rng: random.Random, candidates: int = 24) -> Any:
    if p.type == "categorical" or p.values:
        options = [choice_value(c) for c in p.choices] if p.type == "categorical" and p.choices else list(p.values or [])

        def weight(v: Any, seen: list[Any]) -> float:
            return (sum(1 for s in seen if s == v) + 1.0) / (len(seen) + len(options))

        return max(options, key=lambda v: (weight(v, good) / weight(v, bad), -options.index(v)))
    g = [_to_unit(p, float(v)) for v in good]
    b = [_to_unit(p, float(v)) for v in bad]
    bw_g = max(0.05, 1.0 / (1 + len(g)) ** 0.5 / 2)
    bw_b = max(0.05, 1.0 / (1 + len(b)) ** 0.5 / 2)
    best_u, best_score = 0.5, -math.inf
    for _ in range(candidates):
        centre = rng.choice(g) if g else rng.random()
        u = min(1.0, max(0.0, rng.gauss(centre, bw_g)))
        score = math.log(_parzen(g, u, bw_g)) - math.log(_parzen(b, u, bw_b))
        if score > best_score:
            best_u, best_score = u, score
    return _from_unit(p, best_u)


def propose_trial(
    search: HyperparameterSearchSpec,
    index: int,
    history: list[tuple[dict[str, Any], float]],
    seed: int,
) -> dict[str, Any]:
    """Values for trial ``index`` given the finished trials' (values, metric) so far.

    grid: the index-th grid point; random: independent uniform draws; tpe: random for the first
    few trials, then a tree-structured Parzen estimator per parameter over the better quarter of
    the history versus the rest.
    """
    rng = random.Random(f"{seed}:{index}")
    space = search.parameters
    if search.sampler == "grid":
        points = grid_points(space)
        return points[index % len(points)]
    startup = max(3, search.trials // 4)
    if search.sampler == "random" or len(history) < startup:
        return {p.path: _sample_uniform(p, rng) for p in space}
    ordered = sorted(history, key=lambda h: h[1], reverse=search.mode == "max")
    n_good = max(1, math.ceil(0.25 * len(ordered)))
    good, bad = ordered[:n_good], ordered[n_good:]
    return {p.path: _tpe_one(p, [v[p.path] for v, _ in good], [v[p.path] for v, _ in bad], rng) for p in space}


def trial_count(search: HyperparameterSearchSpec) -> int:
    """How many trials run: ``trials``, capped at the grid size for grid search."""
    if search.sampler == "grid":
        return min(search.trials, len(grid_points(search.parameters)))
    return search.trials


# --- trials -----------------------------------------------------------------------------------

#: Labels that tie a trial to its search (the parent FineTuneJob).
SEARCH_LABEL = "kubetune.io/search"
TRIAL_INDEX_LABEL = "kubetune.io/trial-index"


def search_label_value(parent: str) -> str:
    """The value of ``kubetune.io/search`` on the trials of ``parent`` (a label value: 63
    characters at most, alphanumeric at both ends). Long names may share it: owners tell apart."""
    return parent[:63].rstrip("-.")


def trial_name(parent: str, index: int) -> str:
    """``<parent>-trial-003``, shortened with a hash when the parent's name is long."""
    import hashlib

    suffix = f"-trial-{index:03d}"
    if len(parent) + len(suffix) <= 63:
        return parent + suffix
    digest = hashlib.sha256(parent.encode()).hexdigest()[:8]
    return f"{parent[: 63 - len(suffix) - 9].rstrip('-.')}-{digest}{suffix}"


def trial_manifest(parent: dict[str, Any], index: int, values: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob manifest of one trial: the parent's spec with the trial's values, without the
    search block, capped at ``maxStepsPerTrial``. The caller validates it (values may break a rule)."""
    spec = copy.deepcopy(parent["spec"])
    search = spec.get("techniques", {}).pop("hyperparameterSearch")
    if not spec["techniques"]:
        spec.pop("techniques")
    spec = apply_trial(spec, values)
    if search.get("maxStepsPerTrial"):
        spec.setdefault("training", {})["maxSteps"] = search["maxStepsPerTrial"]
    meta = parent.get("metadata", {})
    labels = {**(meta.get("labels") or {}), SEARCH_LABEL: search_label_value(meta["name"]), TRIAL_INDEX_LABEL: str(index)}
    metadata: dict[str, Any] = {"name": trial_name(meta["name"], index), "labels": labels}
    if meta.get("namespace"):
        metadata["namespace"] = meta["namespace"]
    return {"apiVersion": parent["apiVersion"], "kind": parent["kind"], "metadata": metadata, "spec": spec}


def trial_metric(status: dict[str, Any], metric: str) -> float | None:
    """The search metric from a trial's status (``progress.metrics`` or ``progress.evalLoss``)."""
    progress = status.get("progress") or {}
    metrics = progress.get("metrics") or {}
    if metric in metrics:
        return float(metrics[metric])
    if metric in {"eval_loss", "evalLoss"} and progress.get("evalLoss") is not None:
        return float(progress["evalLoss"])
    if metric in {"loss", "train_loss"} and progress.get("loss") is not None:
        return float(progress["loss"])
    return None


def kept_trials(trials: list[Any], mode: str, limit: int) -> list[Any]:
    """At most ``limit`` trial records (objects with ``index``, ``metric``, ``state``) for status, in
    index order: the unfinished ones first, then the best by metric, then the newest of the rest."""
    if len(trials) <= limit:
        return list(trials)
    sign = -1.0 if mode == "max" else 1.0

    def priority(t: Any) -> tuple[int, float, int]:
        if t.state in ("Pending", "Running"):
            return (0, 0.0, -t.index)
        if t.state == "Succeeded" and t.metric is not None:
            return (1, sign * t.metric, t.index)
        return (2, 0.0, -t.index)

    keep = {t.index for t in sorted(trials, key=priority)[:limit]}
    return [t for t in trials if t.index in keep]
