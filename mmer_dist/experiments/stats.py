"""Statistics of repeated runs and of paired prediction sets (numpy + scipy.stats; no torch).

Over runs, `describe(values)`: mean, sample standard deviation (ddof=1) and a 95% confidence
interval of the mean from Student's t distribution, `scipy.stats.t.interval(0.95, n - 1, mean,
scipy.stats.sem(values))`. Student t rather than the normal approximation because a sweep has
3-5 runs: t(0.975, df=2) = 4.30 where z = 1.96 would make the interval less than half as wide as
it should be. It assumes the runs are independent draws of one procedure (different seeds, or
folds) with roughly normal scores. One run has no standard deviation and no interval: both are
None, never invented.

Between two prediction sets on the same samples, `paired_bootstrap(...)`: the difference of
Macro-F1 (and of each class's F1) of A minus B, with a percentile interval from a paired cluster
bootstrap. Each resample draws the corpus's independent units with replacement (MELD: whole
dialogues; RAVDESS: actors; otherwise utterances), the same draw for A and B, and scores both on
it; utterances of one dialogue or actor are correlated, so resampling utterances would make the
interval too narrow (tests/unit/test_stats.py measures both). The resampling is
`scipy.stats.bootstrap(method="percentile")` over unit indices, seeded, so the same call gives
the same numbers. A side may hold several prediction sets (the runs of a sweep): the statistic
is then the mean Macro-F1 over A's sets minus the mean over B's, every set scored on the same
resampled units (the interval covers evaluation-sample variation for these trained runs; seed
variation is what `describe` over runs measures).

The two-sided p-value inverts the percentile interval: with B resampled differences d*,
    p = min(1, 2 * (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1))
the smallest level at which the two-sided percentile interval excludes 0 (so p < 0.05 exactly
when the 95% interval lies on one side of 0, up to ties), with the +1 of Davison & Hinkley (1997,
eq. 4.11) so a finite number of resamples never reports p = 0.

One prediction set (say, every clip of a fold sweep, each tested by the fold that held its actor out),
`cluster_bootstrap(...)`: percentile intervals of its Macro-F1, accuracy, UAR and per-class F1 over the
same resampled units.

    s = describe([0.41, 0.45, 0.43]);  s.mean, s.std, s.ci95
    r = paired_bootstrap(y, [pred_a], [pred_b], groups, labels, unit="dialogue", seed=0)
    r.difference, r.ci95, r.p_value, r.per_class["fear"]
    c = cluster_bootstrap(y, [pred], groups, labels, unit="speaker");  c["metrics"]["uar"]["ci95"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
FEW_UNITS = 20   # fewer independent units than this: the bootstrap interval is coarse (said in the result)


# --------------------------------------------------------------------------- over runs
@dataclass(frozen=True)
class Spread:
    """One metric over runs: n, mean, standard deviation (ddof=1) and the t interval of the mean."""

    n: int
    mean: float
    std: float | None           # None for a single run
    ci95: tuple[float, float] | None   # None for a single run

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "mean": self.mean, "std": self.std,
                               "ci95": list(self.ci95) if self.ci95 is not None else None}
        if self.ci95 is None:
            out["note"] = "one run: no standard deviation or interval (run more seeds)"
        return out


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> Spread:
    """Mean, std (ddof=1) and Student-t confidence interval of the mean of `values` (one per run)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("describe() needs at least one value (one per run)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"describe() got non-finite values {x.tolist()}")
    mean = float(x.mean())
    if x.size == 1:
        return Spread(1, mean, None, None)
    std = float(x.std(ddof=1))
    if std == 0.0:   # identical runs: scipy would return nan for a zero scale
        return Spread(int(x.size), mean, 0.0, (mean, mean))
    lo, hi = stats.t.interval(confidence, df=x.size - 1, loc=mean, scale=stats.sem(x))
    return Spread(int(x.size), mean, std, (float(lo), float(hi)))


# --------------------------------------------------------------------------- confusion arithmetic
def unit_confusions(y_true: np.ndarray, y_pred: np.ndarray, unit_index: np.ndarray,
                    n_units: int, k: int) -> np.ndarray:
    """Per-unit confusion counts, shape (n_units, k * k), row-major (true, predicted)."""
    flat = (np.asarray(unit_index, np.int64) * k + np.asarray(y_true, np.int64)) * k + np.asarray(y_pred, np.int64)
    return np.bincount(flat, minlength=n_units * k * k).reshape(n_units, k * k).astype(np.float64)


def f1_from_confusions(conf: np.ndarray, k: int) -> np.ndarray:
    """Per-class F1 of confusion matrices (..., k*k) -> (..., k): 2tp / (2tp + fp + fn), 0 when undefined
    (scikit-learn's zero_division=0, as mmer_dist.train.metrics computes it)."""
    cm = conf.reshape(*conf.shape[:-1], k, k)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(axis=-1) + cm.sum(axis=-2)          # (tp + fn) + (tp + fp)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def _resample_counts(idx: np.ndarray, n_units: int) -> np.ndarray:
    """How often each unit occurs in each resample: (..., n) unit indices -> (batch, n_units) counts."""
    idx = np.atleast_2d(idx).astype(np.int64)
    rows = idx.reshape(-1, idx.shape[-1])
    offsets = (np.arange(rows.shape[0]) * n_units)[:, None]
    return np.bincount((rows + offsets).ravel(), minlength=rows.shape[0] * n_units).reshape(
        rows.shape[0], n_units).astype(np.float64)


def two_sided_p(resampled: np.ndarray) -> float:
    """p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)): the percentile interval inverted."""
    d = np.asarray(resampled, dtype=np.float64)
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return float(min(1.0, 2.0 * (1 + tail) / (d.size + 1)))


def _unit_index(groups: Sequence[Any], n: int, unit: str, caller: str) -> tuple[np.ndarray, int]:
    """Each sample's unit as 0..u-1, and u (at least 2: resampling one unit gives nothing)."""
    if len(groups) != n:
        raise ValueError(f"{caller}: {len(groups)} groups for {n} samples")
    names, unit_index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    if names.size < 2:
        raise ValueError(f"{caller}: the samples come from {names.size} {unit}(s); resampling needs at least 2")
    return unit_index, int(names.size)


def _percentiles(statistic: Any, u: int, resamples: int, seed: int,
                 confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scipy's percentile bootstrap over unit indices 0..u-1: (low, high, resampled values)."""
    from scipy import stats

    res = stats.bootstrap((np.arange(u),), statistic, vectorized=True, n_resamples=resamples, batch=1000,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return (np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high),
            np.asarray(res.bootstrap_distribution))


# --------------------------------------------------------------------------- paired bootstrap
@dataclass(frozen=True)
class PairedBootstrap:
    """A minus B: Macro-F1 and per-class F1 differences with percentile intervals and p-values."""

    a: float
    b: float
    difference: float
    ci95: tuple[float, float]
    p_value: float
    unit: str
    units: int
    n: int
    resamples: int
    seed: int
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"metric": "macro_f1", "a": self.a, "b": self.b, "difference": self.difference,
               "ci95": list(self.ci95), "p_value": self.p_value, "unit": self.unit, "units": self.units,
               "n": self.n, "resamples": self.resamples, "seed": self.seed, "per_class": self.per_class}
        if self.note:
            out["note"] = self.note
        return out


def _as_sets(preds: Any, n: int, side: str) -> list[np.ndarray]:
    sets = [np.asarray(preds, np.int64)] if np.ndim(preds) == 1 else [np.asarray(p, np.int64) for p in preds]
    if not sets:
        raise ValueError(f"paired_bootstrap: side {side} has no prediction set")
    for i, p in enumerate(sets):
        if p.shape != (n,):
            raise ValueError(f"paired_bootstrap: side {side} set {i} has {p.size} predictions for {n} samples")
    return sets


def paired_bootstrap(y_true: Sequence[int], preds_a: Any, preds_b: Any, groups: Sequence[Any],
                     labels: Sequence[str], *, unit: str = "utterance", resamples: int = RESAMPLES,
                     seed: int = 0, confidence: float = CONFIDENCE) -> PairedBootstrap:
    """Cluster bootstrap of Macro-F1(A) - Macro-F1(B) on the same samples, resampling whole `groups`.

    `y_true`: label ids (n,); `preds_a`/`preds_b`: predicted ids (n,) or a list of such arrays (runs;
    the mean over them is compared); `groups`: the independent unit of each sample (dialogue, actor,
    or the key itself); `unit` names it in the result.
    """
    y = np.asarray(y_true, np.int64)
    k, n = len(labels), y.size
    sets_a, sets_b = _as_sets(preds_a, n, "A"), _as_sets(preds_b, n, "B")
    unit_index, u = _unit_index(groups, n, unit, "paired_bootstrap")
    conf_a = [unit_confusions(y, p, unit_index, u, k) for p in sets_a]
    conf_b = [unit_confusions(y, p, unit_index, u, k) for p in sets_b]

    def side_f1(weights: np.ndarray, confs: list[np.ndarray]) -> np.ndarray:   # (batch, k)
        return np.mean([f1_from_confusions(weights @ c, k) for c in confs], axis=0)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:   # (1 + k, batch): macro, then per class
        w = _resample_counts(idx, u)
        fa, fb = side_f1(w, conf_a), side_f1(w, conf_b)
        d = fa - fb
        out = np.concatenate([d.mean(axis=-1, keepdims=True), d], axis=-1).T
        return out if np.ndim(idx) > 1 else out[:, 0]

    ones = np.ones((1, u))
    fa, fb = side_f1(ones, conf_a)[0], side_f1(ones, conf_b)[0]
    lo, hi, dist = _percentiles(statistic, u, resamples, seed, confidence)
    per_class = {name: {"a": float(fa[j]), "b": float(fb[j]), "difference": float(fa[j] - fb[j]),
                        "ci95": [float(lo[j + 1]), float(hi[j + 1])], "p_value": two_sided_p(dist[j + 1])}
                 for j, name in enumerate(labels)}
    note = (f"only {u} independent {unit}s: the interval is coarse (each resample draws {u} of them)"
            if u < FEW_UNITS else "")
    return PairedBootstrap(a=float(fa.mean()), b=float(fb.mean()), difference=float(fa.mean() - fb.mean()),
                           ci95=(float(lo[0]), float(hi[0])), p_value=two_sided_p(dist[0]), unit=unit,
                           units=int(u), n=int(n), resamples=int(resamples), seed=int(seed),
                           per_class=per_class, note=note)


def _headline_from_confusions(conf: np.ndarray, k: int) -> np.ndarray:
    """(batch, k*k) confusion counts -> (batch, 3 + k): Macro-F1, accuracy, UAR (mean recall over the
    labels present, as mmer_dist.train.metrics), then each class's F1."""
    cm = conf.reshape(-1, k, k)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    f1 = f1_from_confusions(conf, k).reshape(-1, k)
    accuracy = tp.sum(axis=-1) / np.maximum(support.sum(axis=-1), 1)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    uar = recall.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)
    return np.concatenate([f1.mean(axis=-1, keepdims=True), accuracy[:, None], uar[:, None], f1], axis=-1)


def cluster_bootstrap(y_true: Sequence[int], preds: Any, groups: Sequence[Any], labels: Sequence[str], *,
                      unit: str = "utterance", resamples: int = RESAMPLES, seed: int = 0,
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Percentile intervals of Macro-F1, accuracy, UAR and each class's F1 of one prediction set (or the
    mean over several, e.g. seeds), resampling whole `groups` as paired_bootstrap does: the interval
    of a figure pooled over held-out folds, where the speakers are the independent units.

    Returns {"unit", "units", "n", "resamples", "seed", "metrics": {"macro_f1": {"value", "ci95"}, ...},
    "per_class": {label: {"f1": {"value", "ci95"}}}} (+ "note" with fewer than FEW_UNITS units)."""
    y = np.asarray(y_true, np.int64)
    k, n = len(labels), y.size
    sets = _as_sets(preds, n, "A")
    unit_index, u = _unit_index(groups, n, unit, "cluster_bootstrap")
    confs = [unit_confusions(y, p, unit_index, u, k) for p in sets]

    def figures(weights: np.ndarray) -> np.ndarray:     # (batch, 3 + k)
        return np.mean([_headline_from_confusions(weights @ c, k) for c in confs], axis=0)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        out = figures(_resample_counts(idx, u)).T
        return out if np.ndim(idx) > 1 else out[:, 0]

    point = figures(np.ones((1, u)))[0]
    lo, hi, _ = _percentiles(statistic, u, resamples, seed, confidence)

    def fig(j: int) -> dict[str, Any]:
        return {"value": float(point[j]), "ci95": [float(lo[j]), float(hi[j])]}

    out: dict[str, Any] = {"unit": unit, "units": int(u), "n": int(n), "resamples": int(resamples), "seed": int(seed),
                           "metrics": {name: fig(j) for j, name in enumerate(("macro_f1", "accuracy", "uar"))},
                           "per_class": {name: {"f1": fig(3 + j)} for j, name in enumerate(labels)}}
    if u < FEW_UNITS:
        out["note"] = f"only {u} independent {unit}s: the interval is coarse (each resample draws {u} of them)"
    return out


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
