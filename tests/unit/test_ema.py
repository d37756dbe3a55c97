"""The weight average (train.ema_decay): its arithmetic, the swap in and out, and its checkpoint state.

Run: .venv/bin/pytest tests/unit/test_ema.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmer_dist.config import ConfigError, TrainConfig
from mmer_dist.train.ema import WeightAverage


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)      # float buffers (running stats) + an integer one (num_batches_tracked)


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.norm.running_mean.fill_(value)
        model.norm.num_batches_tracked.fill_(int(value))


def test_average_is_the_bias_corrected_exponential_mean():
    d = 0.8
    model = Tiny()
    ema = WeightAverage(model, d)
    values = [1.0, 5.0, -2.0, 3.0]
    for v in values:
        _set(model, v)
        ema.update(model)
    n = len(values)
    weights = [d ** (n - 1 - k) for k in range(n)]
    expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    assert ema.shadow["lin.weight"] == pytest.approx(torch.full((2, 3), expected), abs=1e-6)
    assert ema.shadow["norm.running_mean"] == pytest.approx(torch.full((2,), expected), abs=1e-6)
    assert int(ema.shadow["norm.num_batches_tracked"]) == 3     # integers are copied, not averaged
    # the first update takes the weights as they are, whatever the model started from
    first = WeightAverage(Tiny(), d)
    _set(model, 7.0)
    first.update(model)
    assert torch.equal(first.shadow["lin.bias"], torch.full((2,), 7.0))


def test_applied_swaps_the_average_in_and_restores_the_live_weights_exactly():
    model = Tiny()
    ema = WeightAverage(model, 0.9)
    _set(model, 2.0)
    ema.update(model)
    with torch.no_grad():
        model.lin.weight.normal_()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        assert torch.equal(model.lin.weight, torch.full((2, 3), 2.0))
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"):
        with ema.applied(model):
            raise RuntimeError("boom")
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())


def test_state_round_trip_continues_identically_and_a_foreign_state_is_refused():
    model = Tiny()
    a = WeightAverage(model, 0.9)
    for v in (1.0, 2.0):
        _set(model, v)
        a.update(model)
    b = WeightAverage(Tiny(), 0.9)
    b.load_state_dict(a.state_dict())
    _set(model, 3.0)
    a.update(model)
    b.update(model)
    assert b.updates == a.updates == 3
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
    with pytest.raises(ValueError, match="does not fit this model"):
        WeightAverage(nn.Linear(3, 2), 0.9).load_state_dict(a.state_dict())


def test_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match="must be in"):
        WeightAverage(Tiny(), 1.0)
    with pytest.raises(ConfigError, match="train.ema_decay"):
        TrainConfig(ema_decay=1.5)
