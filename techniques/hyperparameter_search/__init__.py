"""Technique 8, hyperparameter search: the ``spec.techniques.hyperparameterSearch`` block, its rules and what it
needs of the data path (its operator hook is ``kubetune.operator.searching``, its local one ``kubetune.trainer.searching``;
the trials are ordinary runs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from kubetune.api.base import SpecModel
from kubetune.api.problems import Problem
from kubetune.techniques.declarations import Capability, Declaration, Requirement

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec


class SearchParameter(SpecModel):
    """One dimension of the search space."""

    path: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[a-zA-Z][A-Za-z0-9_]*(\.[a-zA-Z][A-Za-z0-9_]*)+$",
        description="Dotted spec path of the field tuned, e.g. `training.learningRate` or `peft.r`.",
    )
    type: Literal["float", "int", "categorical"] = Field(description="Kind of values.")
    low: float | None = Field(default=None, description="Lower bound (float, int).")
    high: float | None = Field(default=None, description="Upper bound (float, int).")
    log: bool = Field(default=False, description="Sample on a log scale.")
    values: list[float] | None = Field(default=None, min_length=1, max_length=1000, description="Explicit numeric values (float, int; required for grid over floats).")
    choices: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Choices of a categorical parameter, as YAML scalars in strings (`cosine`, `true`, `8`).",
    )


class HyperparameterSearchSpec(SpecModel):
    """Hyperparameter tuning: trials as child runs, a sampler, the best trial kept."""

    sampler: Literal["grid", "random", "tpe"] = Field(default="random", description="How trials are proposed.")
    trials: int = Field(default=8, ge=1, le=10000, description="Number of trials (grid: at most the grid size).")
    parallelism: int = Field(default=1, ge=1, le=1000, description="Trials run at once.")
    metric: str = Field(default="eval_loss", max_length=128, pattern=r"^[A-Za-z0-9_./\-]+$", description="Metric to optimise.")
    mode: Literal["min", "max"] = Field(default="min", description="Minimise or maximise the metric.")
    parameters: list[SearchParameter] = Field(min_length=1, max_length=64, description="The search space.")
    max_steps_per_trial: int | None = Field(default=None, ge=1, le=10**9, description="Cap each trial's steps.")
    pruner: Literal["none", "median", "successive-halving"] = Field(
        default="none",
        description=(
            "Stop unpromising trials early from the metric at each evaluation (`data.eval.everySteps`): "
            "`median` stops a trial whose best value so far is worse than the median of the finished trials at the same step; "
            "`successive-halving` keeps the best quarter at each rung (optuna's reduction factor 4). "
            "A pruned trial stops (in a cluster its FineTuneJob is suspended, its checkpoints kept) and the next one starts."
        ),
    )


def _requires(config: HyperparameterSearchSpec) -> Iterator[Requirement]:
    yield Requirement(Capability.ARRANGES_RUNS, "a search runs trials as FineTuneJobs of their own")
    if config.metric.startswith("eval"):
        yield Requirement(Capability.NEEDS_EVAL_DATA, repr(config.metric), "metric")


def _search_space(spec: FineTuneJobSpec) -> Iterator[Problem]:
    hs = spec.techniques.hyperparameter_search
    if hs is None:
        return
    from kubetune.api.searching import resolve_search_path

    for i, p in enumerate(hs.parameters):
        where = f"spec.techniques.hyperparameterSearch.parameters[{i}]"
        error = resolve_search_path(p.path)
        if error:
            yield Problem(f"{where}.path", error)
        if p.type in {"float", "int"}:
            if p.values is None and (p.low is None or p.high is None):
                yield Problem(where, f"a {p.type} parameter needs low and high (or values for grid)")
            elif p.low is not None and p.high is not None and p.low >= p.high:
                yield Problem(f"{where}.high", f"must be > low ({p.low}), got {p.high}")
            if p.log and p.low is not None and p.low <= 0:
                yield Problem(f"{where}.low", f"a log-scale parameter needs low > 0, got {p.low}")
        if p.type == "categorical" and not p.choices:
            yield Problem(f"{where}.choices", "a categorical parameter needs choices")
        if p.type != "categorical" and p.choices:
            yield Problem(f"{where}.choices", f"choices are for categorical parameters; a {p.type} parameter takes low/high or values")
        if hs.sampler == "grid" and p.type == "float" and not p.values:
            yield Problem(f"{where}.values", "grid search needs explicit values for float parameters")
    from kubetune.api.searching import MAX_GRID_POINTS, grid_size

    complete = all(p.values or p.choices or (p.low is not None and p.high is not None) for p in hs.parameters)
    if hs.sampler == "grid" and complete and not any(p.type == "float" and not p.values for p in hs.parameters):
        points = grid_size(hs.parameters)
        if points > MAX_GRID_POINTS:
            yield Problem("spec.techniques.hyperparameterSearch.parameters",
                          f"the grid has {points} points, at most {MAX_GRID_POINTS}: give fewer values, or sample with random or tpe")


DECLARATION = Declaration(
    key="hyperparameterSearch",
    number=8,
    title="Hyperparameter search over trials",
    spec=HyperparameterSearchSpec,
    capabilities=frozenset({Capability.ARRANGES_RUNS, Capability.NEEDS_EVAL_DATA}),
    requires=_requires,
    rules=(_search_space,),
    operator="kubetune.operator.searching",
    local="kubetune.trainer.searching:run_search",
    trainer=None,
)
