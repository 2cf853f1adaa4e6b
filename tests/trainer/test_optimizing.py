"""``spec.training.optimizer``, ``lrScheduler``, ``warmupSteps`` and ``warmupRatio`` do what the spec
reference says (pure: a one-parameter model, no training run)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kubetune.api import parse_spec
from kubetune.trainer.optimizing import default_param_groups, make_optimizer, make_scheduler


def _spec(**training: Any) -> Any:
    return parse_spec({"model": {"source": "hf://o/m"}, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]},
                       "training": {"learningRate": 0.1, **training}})


def _lrs(spec: Any, total: int) -> list[float]:
    """The learning rate of each of ``total`` optimizer steps."""
    model = torch.nn.Linear(2, 1)
    optimizer = make_optimizer(spec, default_param_groups(model, spec))
    scheduler = make_scheduler(spec, optimizer, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(("name", "kind"), [("adamw", "AdamW"), ("adam", "Adam"), ("sgd", "SGD"), ("adafactor", "Adafactor")])
def test_every_optimizer_of_the_spec_is_the_one_built(name: str, kind: str) -> None:
    spec = _spec(optimizer=name, adamBeta1=0.8, adamBeta2=0.95, adamEpsilon=1e-6)
    model = torch.nn.Linear(2, 1)
    optimizer = make_optimizer(spec, default_param_groups(model, spec))
    assert type(optimizer).__name__ == kind
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1
    if name in ("adamw", "adam"):
        assert (group["betas"], group["eps"]) == ((0.8, 0.95), 1e-6)
    if name == "sgd":
        assert group["momentum"] == 0.8  # adamBeta1 is SGD's momentum
    before = model.weight.detach().clone()
    model(torch.ones(4, 2)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight), f"{name} did not update the weights"


def test_the_schedules_after_warmup() -> None:
    peak = 0.1
    constant = _lrs(_spec(lrScheduler="constant"), 10)
    assert constant == [peak] * 10  # constant ignores warmup
    with_warmup = _lrs(_spec(lrScheduler="constant-with-warmup", warmupSteps=4), 10)
    assert with_warmup[:4] == pytest.approx([0.0, 0.025, 0.05, 0.075]) and with_warmup[4:] == [peak] * 6
    linear = _lrs(_spec(lrScheduler="linear", warmupSteps=2), 10)
    assert linear[2] == pytest.approx(peak) and linear[-1] == pytest.approx(peak / 8)  # to 0 at step 10
    assert all(a > b for a, b in zip(linear[2:], linear[3:]))
    cosine = _lrs(_spec(lrScheduler="cosine", warmupSteps=2), 10)
    assert cosine[2] == pytest.approx(peak) and cosine[-1] < linear[-1] and all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    inverse = _lrs(_spec(lrScheduler="inverse-sqrt", warmupSteps=4), 16)
    assert inverse[4] == pytest.approx(peak) and inverse[15] == pytest.approx(peak * (4 / 15) ** 0.5)


def test_warmup_steps_win_over_the_ratio_and_the_ratio_is_of_the_total() -> None:
    by_ratio = _lrs(_spec(lrScheduler="constant-with-warmup", warmupRatio=0.3), 10)
    assert by_ratio[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # 3 of 10 steps warm up
    both = _lrs(_spec(lrScheduler="constant-with-warmup", warmupRatio=0.5, warmupSteps=2), 10)
    assert both[:3] == pytest.approx([0.0, 0.05, 0.1])  # warmupSteps: 2, not 5
