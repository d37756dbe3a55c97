"""Classification head and the training losses (the class-imbalance knob on the objective side).

`build_loss(cfg.loss, class_counts)` returns an nn.Module `loss(logits[B, C], labels[B]) -> scalar`:

    ce              cross-entropy, mean over the batch
    weighted_ce     cross-entropy with inverse-frequency class weights w_c proportional to 1 / n_c
                    (mmer_dist.weighting "inverse"; absent classes get 0), normalised by the weights
                    of the batch's labels (PyTorch's weighted mean, so the scale of w cancels: the
                    same loss as sklearn's "balanced" w_c = N / (C' n_c))
    focal           -sum_c q_c (1 - p_c)^gamma log p_c, mean over the batch (Lin et al. 2017);
                    q is the one-hot (or label-smoothed) target
    class_balanced  (1/B) sum_i w_{y_i} CE_i with w_c = (1 - beta) / (1 - beta^{n_c}) scaled to sum to C'
                    (effective number of samples, Cui et al. 2019)
    logit_adjusted  CE on logits + tau log(pi_c), pi = the training class prior (Menon et al. 2021):
                    the raw logits (what eval and predict use) then target the balanced error
                    (UAR) at tau=1, with no reweighting or resampling; classes absent from the
                    counts get the prior of one example

`loss.label_smoothing` applies to all of them (as in torch.nn.functional.cross_entropy). Losses are
computed in float32 whatever the logits' dtype. The class weights are buffers: move the loss to the
model's device with `.to(device)`. Every loss also gives `sample_terms(logits, labels) -> (terms[B],
weights[B])` with loss = sum(terms) / sum(weights) (the same criterion summed over any number of
batches: what evaluation reports as its loss). The class weights come from mmer_dist.weighting.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmer_dist.config import LOSSES, ConfigError, LossConfig
from mmer_dist.weighting import class_weights


class ClassificationHead(nn.Module):
    """Pooled vector [B, width] -> logits [B, num_classes] (a small MLP)."""

    def __init__(self, width: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, width), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


def _class_weights(class_counts: Sequence[int], scheme: str, beta: float = 0.999) -> Tensor:
    """mmer_dist.weighting.class_weights as a float32 tensor (a loss buffer)."""
    return torch.from_numpy(class_weights(list(class_counts), scheme, beta=beta)).float()


class CrossEntropyLoss(nn.Module):
    """CE with optional per-class weights (PyTorch semantics: weighted mean over the batch)."""

    def __init__(self, label_smoothing: float = 0.0, weight: Tensor | None = None) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.weight, label_smoothing=self.label_smoothing)

    def sample_terms(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=self.label_smoothing)
        w = self.weight[labels] if self.weight is not None else torch.ones_like(ce)
        return ce * w, w


class FocalLoss(nn.Module):
    """-sum_c q_c (1 - p_c)^gamma log p_c, mean over the batch; q = (smoothed) one-hot target."""

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        c = logits.shape[-1]
        target = F.one_hot(labels, c).float() * (1.0 - self.label_smoothing) + self.label_smoothing / c
        focal = (1.0 - logp.exp()).clamp(min=0.0) ** self.gamma
        return -(target * focal * logp).sum(-1).mean()

    def sample_terms(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logp = F.log_softmax(logits.float(), dim=-1)
        c = logits.shape[-1]
        target = F.one_hot(labels, c).float() * (1.0 - self.label_smoothing) + self.label_smoothing / c
        terms = -(target * (1.0 - logp.exp()).clamp(min=0.0) ** self.gamma * logp).sum(-1)
        return terms, torch.ones_like(terms)


class ClassBalancedLoss(nn.Module):
    """(1/B) sum_i w_{y_i} CE_i with effective-number weights (Cui et al. 2019)."""

    def __init__(self, weight: Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        ce = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=self.label_smoothing)
        return (self.weight[labels] * ce).mean()

    def sample_terms(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=self.label_smoothing)
        return self.weight[labels] * ce, torch.ones_like(ce)


class LogitAdjustedLoss(nn.Module):
    """CE(logits + tau log prior, y): the prior enters the loss only, so the model learns it need not."""

    def __init__(self, log_prior: Tensor, tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("offset", tau * log_prior, persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float() + self.offset, labels, label_smoothing=self.label_smoothing)

    def sample_terms(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(logits.float() + self.offset, labels, reduction="none",
                             label_smoothing=self.label_smoothing)
        return ce, torch.ones_like(ce)


def build_loss(cfg: LossConfig, class_counts: Sequence[int] | None = None) -> nn.Module:
    """The loss `cfg.name` describes; `class_counts` (training split, index order) feed the class weights."""
    if cfg.name == "ce":
        return CrossEntropyLoss(cfg.label_smoothing)
    if cfg.name == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.label_smoothing)
    counts = list(class_counts or [])
    if not counts or sum(counts) <= 0 or any(n < 0 for n in counts):
        raise ConfigError(f"loss.name={cfg.name} needs the training split's per-class counts (from the shards' "
                          f"index), got {counts!r}; pass build_loss(cfg.loss, index.class_counts) or use loss.name=ce")
    if cfg.name == "weighted_ce":
        return CrossEntropyLoss(cfg.label_smoothing, _class_weights(counts, "inverse"))
    if cfg.name == "class_balanced":
        return ClassBalancedLoss(_class_weights(counts, "effective_number", cfg.cb_beta), cfg.label_smoothing)
    if cfg.name == "logit_adjusted":
        prior = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1.0)
        return LogitAdjustedLoss(torch.log(prior / prior.sum()).float(), cfg.la_tau, cfg.label_smoothing)
    raise ConfigError(f"loss.name={cfg.name!r} is not valid; choose one of {', '.join(LOSSES)}")
