"""Each loss against a value computed by hand (plain math, no torch) on a 2-sample, 3-class case.

Run: .venv/bin/pytest tests/unit/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from mmer_dist.config import ConfigError, LossConfig
from mmer_dist.models.heads import build_loss

LOGITS = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
LABELS = [0, 2]
COUNTS = [10, 5, 1]


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


P = [softmax(r) for r in LOGITS]
NLL = [-math.log(P[i][y]) for i, y in enumerate(LABELS)]  # per-sample CE


def run(cfg: LossConfig, counts=COUNTS) -> float:
    loss = build_loss(cfg, counts)
    return loss(torch.tensor(LOGITS), torch.tensor(LABELS)).item()


def test_ce():
    assert run(LossConfig(name="ce")) == pytest.approx((NLL[0] + NLL[1]) / 2, rel=1e-6)


def test_label_smoothing():
    eps = 0.1
    per = [(1 - eps) * NLL[i] + eps / 3 * sum(-math.log(p) for p in P[i]) for i in range(2)]
    assert run(LossConfig(name="ce", label_smoothing=eps)) == pytest.approx(sum(per) / 2, rel=1e-6)


def test_weighted_ce_inverse_frequency():
    n, c = sum(COUNTS), 3
    w = [n / (c * k) for k in COUNTS]  # 16/30, 16/15, 16/3
    expected = (w[0] * NLL[0] + w[2] * NLL[1]) / (w[0] + w[2])
    assert run(LossConfig(name="weighted_ce")) == pytest.approx(expected, rel=1e-6)


def test_focal():
    gamma = 2.0
    per = [-(1 - P[i][y]) ** gamma * math.log(P[i][y]) for i, y in enumerate(LABELS)]
    assert run(LossConfig(name="focal", focal_gamma=gamma)) == pytest.approx(sum(per) / 2, rel=1e-6)
    # gamma = 0 is plain cross-entropy
    assert run(LossConfig(name="focal", focal_gamma=0.0)) == pytest.approx(run(LossConfig(name="ce")), rel=1e-6)


def test_class_balanced_effective_number():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta ** k) for k in COUNTS]
    w = [v / sum(raw) * 3 for v in raw]
    expected = (w[0] * NLL[0] + w[2] * NLL[1]) / 2
    assert run(LossConfig(name="class_balanced", cb_beta=beta)) == pytest.approx(expected, rel=1e-6)


def test_logit_adjusted_adds_tau_log_prior():
    tau = 0.5
    prior = [k / sum(COUNTS) for k in COUNTS]
    adjusted = [[z + tau * math.log(p) for z, p in zip(row, prior)] for row in LOGITS]
    per = [-math.log(softmax(adjusted[i])[y]) for i, y in enumerate(LABELS)]
    assert run(LossConfig(name="logit_adjusted", la_tau=tau)) == pytest.approx(sum(per) / 2, rel=1e-6)
    assert run(LossConfig(name="logit_adjusted", la_tau=0.0)) == pytest.approx(run(LossConfig(name="ce")), rel=1e-6)
    # the rare class 2 (1 of 16 rows) is harder to fit under the offset, so its row's loss grows
    assert run(LossConfig(name="logit_adjusted")) > run(LossConfig(name="ce"))


def test_absent_class_gets_zero_weight_and_no_nan():
    counts = [10, 0, 6]
    n = 16
    w = [n / (2 * 10), 0.0, n / (2 * 6)]
    expected = (w[0] * NLL[0] + w[2] * NLL[1]) / (w[0] + w[2])
    assert run(LossConfig(name="weighted_ce"), counts) == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(run(LossConfig(name="class_balanced"), counts))
    assert math.isfinite(run(LossConfig(name="logit_adjusted"), counts))


def test_weights_need_counts():
    with pytest.raises(ConfigError, match="per-class counts"):
        build_loss(LossConfig(name="weighted_ce"), [])
    with pytest.raises(ConfigError, match="per-class counts"):
        build_loss(LossConfig(name="class_balanced"), None)


@pytest.mark.parametrize("name", ["ce", "weighted_ce", "focal", "class_balanced", "logit_adjusted"])
def test_bf16_logits_give_a_float32_loss_with_gradient(name):
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16, requires_grad=True)
    loss = build_loss(LossConfig(name=name), COUNTS)(logits, torch.tensor(LABELS))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
