"""The one place optimizer groups are split by parameter name (transfer learning, layer selection
and regularisation all use it): every parameter lands in exactly one group, in the order of the
parts, each group keeps the settings it had unless its part changes them, and empty parts vanish."""

from __future__ import annotations

import torch

from kubetune.trainer.grouping import split_groups


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.Linear(2, 1))


def test_each_parameter_goes_to_the_group_of_its_part_in_the_order_of_the_parts() -> None:
    model = _model()
    groups = [{"params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.0, "name": "default"}]
    rates = {"head": 1.0, "base": None}
    out = split_groups(model, groups, lambda n: "head" if n.startswith("2.") else "base", ["head", "base"],
                       lambda group, part: {"lr": rates[part] or group["lr"], "name": f"{group['name']}/{part}"})
    assert [g["name"] for g in out] == ["default/head", "default/base"]
    assert out[0]["param_names"] == ["2.weight", "2.bias"] and out[0]["lr"] == 1.0
    assert out[1]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"] and out[1]["lr"] == 0.1
    assert all(g["weight_decay"] == 0.0 for g in out)  # untouched settings carried over
    named = dict(model.named_parameters())
    for g in out:
        assert [id(p) for p in g["params"]] == [id(named[n]) for n in g["param_names"]]


def test_groups_split_again_keep_their_names_and_lose_empty_parts() -> None:
    model = _model()
    first = split_groups(model, [{"params": list(model.parameters()), "lr": 0.1}], lambda n: n.startswith("1."), (True, False),
                         lambda group, norm: {"weight_decay": 0.0 if norm else 0.01})
    again = split_groups(model, first, lambda n: -1, range(-1, 3), lambda group, index: {})
    assert [g["param_names"] for g in again] == [["1.weight", "1.bias"], ["0.weight", "0.bias", "2.weight", "2.bias"]]
    assert [g["weight_decay"] for g in again] == [0.0, 0.01]
