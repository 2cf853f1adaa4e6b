"""Hyperparameter search: which spec fields a search may tune, how trials are proposed (optuna's
grid, random and TPE samplers) and pruned (optuna's median and successive-halving pruners), and
how a trial's values are written into a copy of the spec.

Called by the operator (``kubetune.operator.searching``: trials as child FineTuneJobs) and by
``kubetune train`` (``kubetune.trainer.searching``: trials one after another). Why some of it is
still written here, not taken from optuna, is said above the samplers.

A path is dotted camelCase under ``spec`` (``training.learningRate``, ``peft.r``). It must name a
scalar field; the trial's spec is re-validated, so a value out of a field's bounds is caught.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import math
from typing import Any, Literal, NamedTuple, Sequence, get_args, get_origin

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
    if path.split(".")[0] in {"model", "data", "resources", "checkpointing", "output", "s3", "runPolicy"}:
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
# optuna proposes the values (GridSampler, RandomSampler, TPESampler) and decides pruning
# (MedianPruner, SuccessiveHalvingPruner), in ask/tell style: the trials run elsewhere (child
# FineTuneJobs in a cluster, one after another under `kubetune train`), so there is no optuna
# storage. Each proposal rebuilds an in-memory study from the trials proposed before with
# `study.add_trial(create_trial(...))`, then asks it once: their values, states and metrics, which
# the cluster keeps on the trial FineTuneJobs (kubetune.operator.searching.past_trials), and, under
# `kubetune train`, the metric at each evaluation and the pruner's notes, kept in the run folder.
# What remains hand-written here is that translation: the spec's search space into optuna
# distributions, and stored trials into optuna trials. The sampler's seed is derived from the
# job's seed and the trial's index, so trial i is a function of (seed, i, the trials before it):
# the operator (after a restart, too) and `kubetune train` propose the very same trials.
# optuna is imported inside the functions: an operator that never runs a search never loads it.

#: Trial states (those of TrialRecord.state).
TrialState = Literal["Pending", "Running", "Succeeded", "Failed", "Pruned"]


class PastTrial(NamedTuple):
    """A trial proposed before, as the sampler and pruner learn from it. A plain
    ``(values, metric)`` pair in a history means a trial that succeeded with that metric."""

    values: dict[str, Any]
    metric: float | None = None
    state: TrialState = "Succeeded"
    #: The metric at each evaluation (optimizer step -> value), for pruning.
    intermediate: dict[int, float] = {}
    #: What a pruner recorded on the trial (successive halving's rungs), to be given back.
    pruner_state: dict[str, Any] = {}


History = Sequence["PastTrial | tuple[dict[str, Any], float]"]


def choice_value(text: str) -> Any:
    """A categorical choice as the YAML scalar it spells (`cosine`, `true` -> True, `8` -> 8)."""
    return yaml.safe_load(text) if text.strip() else text


def _axis(p: SearchParameter) -> list[Any]:
    """The values of one grid axis (categorical choices as their text)."""
    if p.type == "categorical":
        return list(p.choices or [])
    if p.values:
        return [int(v) if p.type == "int" else float(v) for v in p.values]
    if p.type == "int" and p.low is not None and p.high is not None:
        return list(range(math.ceil(p.low), math.floor(p.high) + 1))
    raise ValueError(f"{p.path}: grid search needs values")  # rules.py refuses float grids without values


def grid_points(space: list[SearchParameter]) -> list[dict[str, Any]]:
    """Every combination of a grid search, in a stable order."""
    axes = [[choice_value(v) if p.type == "categorical" else v for v in _axis(p)] for p in space]
    return [dict(zip([p.path for p in space], combo)) for combo in itertools.product(*axes)]


#: The most points a grid may have: optuna's GridSampler holds every point in memory (the operator's).
MAX_GRID_POINTS = 100_000


def grid_size(space: list[SearchParameter]) -> int:
    """How many points a grid search's space has, counted without listing them."""
    def length(p: SearchParameter) -> int:
        if p.type == "int" and not p.values and p.low is not None and p.high is not None:
            return max(0, math.floor(p.high) - math.ceil(p.low) + 1)
        return len(_axis(p))

    return math.prod(length(p) for p in space)


def _distribution(p: SearchParameter, grid: bool) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if grid or p.type == "categorical" or p.values:
        return CategoricalDistribution(_axis(p))
    low, high = float(p.low), float(p.high)  # type: ignore[arg-type]
    if p.type == "int":
        return IntDistribution(math.ceil(low), max(math.ceil(low), math.floor(high)), log=p.log)
    return FloatDistribution(low, high, log=p.log)


def _seed(seed: int, index: int) -> int:
    # Each proposal gets a sampler of its own (the study is rebuilt every time), seeded by the
    # trial's index: a sampler seeded by the job's seed alone would propose trial 0 again and again.
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big")


def _startup_trials(search: HyperparameterSearchSpec) -> int:
    """Trials TPE proposes at random before it models the results (and the median pruner waits for)."""
    return max(3, search.trials // 4)


def _sampler(search: HyperparameterSearchSpec, seed: int, index: int) -> Any:
    import optuna

    if search.sampler == "grid":
        return optuna.samplers.GridSampler({p.path: _axis(p) for p in search.parameters}, seed=seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=_seed(seed, index))
    # constant_liar: trials still running count as bad ones, so parallel trials spread out.
    return optuna.samplers.TPESampler(seed=_seed(seed, index), n_startup_trials=_startup_trials(search), constant_liar=True)


def _pruner(search: HyperparameterSearchSpec) -> Any:
    import optuna

    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, search.trials // 4)), n_warmup_steps=0)
    if search.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


_STATES = {"Succeeded": "COMPLETE", "Pruned": "PRUNED", "Failed": "FAIL", "Running": "RUNNING", "Pending": "RUNNING"}


def _frozen(search: HyperparameterSearchSpec, past: PastTrial, distributions: dict[str, Any]) -> Any:
    """``past`` as an optuna trial; a trial whose values are not in the space (or lost) as a failed one."""
    import optuna

    state = optuna.trial.TrialState[_STATES[past.state]]
    if past.state == "Succeeded" and past.metric is None:
        state = optuna.trial.TrialState.FAIL
    params: dict[str, Any] = {}
    for p in search.parameters:
        if p.path not in past.values:
            return optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL)
        value = past.values[p.path]
        if p.type == "categorical":  # optuna holds the choice's text
            value = next((c for c in distributions[p.path].choices if choice_value(c) == value), None)
        params[p.path] = value
    try:
        return optuna.trial.create_trial(
            state=state,
            value=past.metric if state == optuna.trial.TrialState.COMPLETE else None,
            params=params, distributions=distributions,
            intermediate_values={int(k): float(v) for k, v in past.intermediate.items()},
            system_attrs=dict(past.pruner_state),
        )
    except ValueError:  # values outside the space: nothing to learn from them
        return optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL)


def _study(search: HyperparameterSearchSpec, history: History, sampler: Any = None) -> tuple[Any, dict[str, Any]]:
    """An in-memory optuna study holding ``history`` as its trials 0, 1, …, and the distributions."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = search.sampler == "grid"
    distributions = {p.path: _distribution(p, grid) for p in search.parameters}
    study = optuna.create_study(direction="maximize" if search.mode == "max" else "minimize",
                                sampler=sampler, pruner=_pruner(search))
    for past in history:
        study.add_trial(_frozen(search, past if isinstance(past, PastTrial) else PastTrial(*past), distributions))
    return study, distributions


def propose_trial(search: HyperparameterSearchSpec, index: int, history: History, seed: int) -> dict[str, Any]:
    """Values for trial ``index``, given the trials proposed before it (by index; a pair
    ``(values, metric)`` is a trial that succeeded; earlier indices missing from a shorter history
    count as failed trials).

    grid: the grid's points in an order shuffled by the seed, trial i the i-th; random: independent
    uniform draws; tpe: random for the first ``max(3, trials // 4)`` finished trials, then optuna's
    tree-structured Parzen estimator over the finished (and pruned) trials, running ones counting
    as bad (constant liar).
    """
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study, distributions = _study(search, history, _sampler(search, seed, index))
        for _ in range(len(history), index):  # GridSampler gives trial number i the i-th point
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
        trial = study.ask(distributions)
    return {p.path: choice_value(trial.params[p.path]) if p.type == "categorical" else trial.params[p.path]
            for p in search.parameters}


def should_prune(search: HyperparameterSearchSpec, history: History, values: dict[str, Any],
                 intermediate: dict[int, float], pruner_state: dict[str, Any] | None = None) -> tuple[bool, dict[str, Any]]:
    """Whether a running trial (its values and its metric at each evaluation so far) should stop,
    given the other trials; and what the pruner records on the trial (pass it back next time)."""
    if search.pruner == "none" or not intermediate:
        return False, dict(pruner_state or {})
    study, distributions = _study(search, history)
    study.add_trial(_frozen(search, PastTrial(values, None, "Running", intermediate, dict(pruner_state or {})), distributions))
    pruned = bool(study.pruner.prune(study, study.trials[-1]))
    return pruned, dict(study.trials[-1].system_attrs)  # read again: the pruner noted its rungs in the study


def trial_count(search: HyperparameterSearchSpec) -> int:
    """How many trials run: ``trials``, capped at the grid size for grid search."""
    if search.sampler == "grid":
        return min(search.trials, grid_size(search.parameters))
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


def metric_value(metrics: dict[str, Any], metric: str) -> float | None:
    """The search metric from an evaluation's metrics (``eval_loss``, ``accuracy``, …)."""
    if metric in metrics and metrics[metric] is not None:
        return float(metrics[metric])
    for alias in ({"eval_loss", "evalLoss"} if metric in {"eval_loss", "evalLoss"} else set()):
        if metrics.get(alias) is not None:
            return float(metrics[alias])
    return None


def evaluation_step(status: dict[str, Any]) -> int | None:
    """The optimizer step of a trial's latest evaluation (``progress.evalStep``), or None."""
    from kubetune.api.statuses import Progress

    step = (status.get("progress") or {}).get(Progress.model_fields["eval_step"].alias or "eval_step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


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
