"""Class weighting, the one place for it: the schemes, class and sample weights, the target distribution.

Plain numpy (torch tensors are accepted as inputs, torch is never imported), used by the weighted
sampler and the streaming balancer (mmer_dist.data), the losses (mmer_dist.models.heads) and the
config's validation (`SCHEMES`, `LOSS_WEIGHTINGS`):

    cw = class_weights([120, 30, 6], "sqrt_inverse")          # per class
    w = sample_weights(labels, cw)                            # per sample: cw[label]
    p = class_target_distribution([120, 30, 6], cw)           # the class mix a weighted draw reaches
    w, replacement = draw_weights(labels, counts, "inverse")  # what the sampler draws with

A scheme's weights are the same for a sampler (only ratios matter) and a loss: `inverse`,
`sqrt_inverse` and `effective_number` give 0 to absent classes and are rescaled so the classes
present sum to their number (Cui et al.'s normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCHEMES: tuple[str, ...] = ("none", "inverse", "sqrt_inverse", "effective_number", "manual")
"""Class-weighting schemes (`sampler.weighting`)."""


def _numpy(x: Any) -> np.ndarray:
    """numpy view of a list, array or torch tensor (without importing torch)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def class_counts(labels: Any, num_classes: int) -> np.ndarray:
    """Samples per class id (int64, num_classes long); refuses label ids outside [0, num_classes)."""
    y = _as_labels(labels, num_classes)
    return np.bincount(y, minlength=num_classes).astype(np.int64)


def _as_labels(labels: Any, num_classes: int | None) -> np.ndarray:
    y = _numpy(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label id per sample), got shape {tuple(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size:
        hi = num_classes if num_classes is not None else np.iinfo(np.int64).max
        bad = (y < 0) | (y >= hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"labels[{i}] = {y[i]} is not a class id in [0, {hi}) "
                             f"({int(bad.sum())} such labels); check the label set of the index")
    return y


def _as_counts(counts: Any, label_names: Sequence[str] | None) -> np.ndarray:
    if isinstance(counts, Mapping):
        if label_names is None:
            raise ValueError("class counts given by name need label_names=... to fix the class order")
        unknown = sorted(set(counts) - set(label_names))
        if unknown:
            raise ValueError(f"class counts for unknown labels {unknown}; valid: {', '.join(label_names)}")
        counts = [counts.get(name, 0) for name in label_names]
    c = _numpy(counts)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"class counts must be a non-empty 1-D sequence, got shape {tuple(c.shape)}")
    c = c.astype(np.float64)
    if not np.isfinite(c).all() or (c < 0).any():
        i = int(np.argmax(~np.isfinite(c) | (c < 0)))
        raise ValueError(f"class count [{i}] = {c[i]} must be a finite number >= 0")
    if label_names is not None and len(label_names) != c.size:
        raise ValueError(f"{c.size} class counts but {len(label_names)} label_names")
    return c


def class_weights(counts: Any, scheme: str, beta: float = 0.999, manual: Mapping[str, float] | None = None,
                  label_names: Sequence[str] | None = None) -> np.ndarray:
    """Per-class weights (float64, one per class) from per-class sample counts.

    `counts`: a sequence/array of counts in class-id order, or a {label name: count} mapping
    (then `label_names` gives the order; use `class_counts(labels, C)` to count label ids).

    * none: 1 for every class (plain shuffle).
    * inverse: 1 / n_c.   * sqrt_inverse: 1 / sqrt(n_c).
    * effective_number (Cui et al., CVPR 2019): (1 - beta) / (1 - beta ** n_c).
    * manual: `manual[name]` by label name (needs `label_names`); names not in the label set are an
      error listing the valid ones; classes the mapping leaves out get 1.0. Used as given (not rescaled).

    inverse / sqrt_inverse / effective_number give 0 to classes with no samples and are rescaled so
    the classes present sum to their number (Cui et al.'s normalisation): the same weights then
    suit a loss as well as a sampler (for which only ratios matter).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weighting scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    c = _as_counts(counts, label_names)
    present = c > 0
    if scheme == "none":
        return np.ones_like(c)
    if scheme == "manual":
        if manual is None or label_names is None:
            raise ValueError("weighting=manual needs manual={label: weight, ...} and label_names")
        unknown = sorted(set(manual) - set(label_names))
        if unknown:
            raise ValueError(f"manual class weights name unknown labels {unknown}; valid: {', '.join(label_names)}")
        w = np.array([float(manual.get(name, 1.0)) for name in label_names], dtype=np.float64)
        bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            name = label_names[int(np.argmax(bad))]
            raise ValueError(f"manual class weight for {name!r} = {manual[name]} must be finite and >= 0")
        return w
    if not present.any():
        raise ValueError(f"every class count is zero ({c.tolist()}): no weights can be derived")
    w = np.zeros_like(c)
    if scheme == "inverse":
        w[present] = 1.0 / c[present]
    elif scheme == "sqrt_inverse":
        w[present] = 1.0 / np.sqrt(c[present])
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta={beta} must be in (0, 1) for effective_number, e.g. 0.999")
        # 1 - beta**n computed as -expm1(n*log(beta)): exact for beta close to 1.
        w[present] = (1.0 - beta) / -np.expm1(c[present] * math.log(beta))
    w *= present.sum() / w.sum()
    return w


def sample_weights(labels: Any, class_w: Any) -> np.ndarray:
    """Per-sample weights: `class_w[label]` of each sample (float64); refuses out-of-range labels."""
    cw = _numpy(class_w)
    cw = cw.astype(np.float64, copy=False)
    if cw.ndim != 1:
        raise ValueError(f"class weights must be 1-D, got shape {tuple(cw.shape)}")
    y = _as_labels(labels, cw.size)
    return cw[y]


def class_target_distribution(counts: Any, class_w: Any) -> np.ndarray:
    """The class distribution a weighted draw reaches: p_c proportional to n_c * w_c (ClassBalancedStream's target)."""
    c = _as_counts(counts, None)
    cw = np.asarray(class_w, dtype=np.float64)
    if cw.shape != c.shape:
        raise ValueError(f"{c.size} class counts but {cw.size} class weights")
    mass = c * cw
    if not mass.sum() > 0:
        raise ValueError("no class has both samples and a positive weight")
    return mass / mass.sum()


def draw_weights(labels: Any, counts: Any, scheme: str, *, beta: float = 0.999, manual: Mapping[str, float] | None = None,
                 label_names: Sequence[str] | None = None, replacement: bool = True) -> tuple[np.ndarray, bool]:
    """(per-sample weights, replacement) a weighted sampler draws with: `none` is a uniform shuffle (one pass,
    no replacement), any other scheme draws by `sample_weights(labels, class_weights(counts, scheme, ...))`."""
    y = _numpy(labels)
    if scheme == "none":
        return np.ones(y.size, dtype=np.float64), False
    cw = class_weights(counts, scheme, beta=beta, manual=manual or None, label_names=label_names)
    return sample_weights(y, cw), bool(replacement)
