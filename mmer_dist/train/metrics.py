"""Classification metrics of an eval split (the accumulator that sums them over ranks: train/evaluation.py).

`compute_metrics` turns true and predicted labels into the dictionary written as
`metrics.json` (the CLI contract): Macro-F1 is the headline; weighted-F1, accuracy,
unweighted average recall, per-class precision/recall/F1/support and the confusion matrix
(rows = true label) come with it. Every fraction is in [0, 1]; labels are named.
The numbers are computed from the confusion matrix with numpy and equal scikit-learn's
(`zero_division=0`, every label listed even when absent from the split):

    macro_f1     = f1_score(y, p, labels=range(K), average="macro", zero_division=0)
    weighted_f1  = f1_score(y, p, labels=range(K), average="weighted", zero_division=0)
    accuracy     = accuracy_score(y, p)
    uar          = balanced_accuracy_score(y, p)   # mean recall over labels present in y
    per_class    = precision_recall_fscore_support(y, p, labels=range(K), zero_division=0)

`uar` averages recall over the labels that occur in the split (a label with no true
sample has no recall to average); `macro_recall` (over all K labels, absent ones counted
as 0, like macro_f1) is written next to it. With every label present the two are equal.

The ranks of a distributed evaluation add up their confusion matrices (mmer_dist.train.evaluation),
so `metrics_from_confusion` of the sum is identical for 1 and N processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmer_dist.shards.schema import write_json_atomic

HEADLINE = ("macro_f1", "weighted_f1", "accuracy", "uar")


# --------------------------------------------------------------------------- metrics
def _to_ids(values: Any, labels: Sequence[str], what: str) -> np.ndarray:
    """Label ids (int64) from ids or names; an error names the bad entry and the valid range."""
    arr = _to_numpy(values)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence of labels, got shape {arr.shape}")
    if arr.size and arr.dtype.kind in "USO":
        index = {name: i for i, name in enumerate(labels)}
        out = np.empty(arr.size, dtype=np.int64)
        for i, v in enumerate(arr.tolist()):
            if v not in index:
                raise ValueError(f"{what}[{i}] = {v!r} is not a label; expected one of {list(labels)}")
            out[i] = index[v]
        return out
    if arr.size and arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.equal(np.mod(arr, 1), 0)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{what}: expected integer label ids or label names, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= len(labels)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}[{i}] = {int(arr[i])} is not a label id; expected 0..{len(labels) - 1} "
                         f"({len(bad)} bad entries in total)")
    return arr


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a list, numpy array or torch tensor (without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if hasattr(x, "float") and str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts, rows = true label, columns = predicted label."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    den_f = den.astype(np.float64).copy()
    mask = den_f == 0
    den_f[mask] = 1.0
    out = num.astype(np.float64) / den_f
    out[mask] = 0.0
    return out


def metrics_from_confusion(cm: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """The metrics dictionary from a confusion matrix (rows = true) and the label names."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(labels)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({k}, {k}) for labels {list(labels)}")
    n = int(cm.sum())
    if n == 0:
        raise ValueError("no samples to evaluate: the eval split is empty (check the shards and the split name)")
    tp = np.diag(cm).astype(np.int64)
    support = cm.sum(axis=1)          # true counts
    predicted = cm.sum(axis=0)
    precision = _divide(tp, predicted)
    recall = _divide(tp, support)
    # 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted): the form scikit-learn computes.
    f1 = _divide(2.0 * tp, (support + predicted).astype(np.float64))
    present = support > 0
    return {
        "macro_f1": float(np.average(f1)),
        "weighted_f1": float(np.average(f1, weights=support)),
        "accuracy": float(tp.sum() / n),
        "uar": float(np.mean(recall[present])),
        "macro_precision": float(np.average(precision)),
        "macro_recall": float(np.average(recall)),
        "n": n,
        "labels": list(labels),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
    }


def compute_metrics(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of predictions `y_pred` against `y_true` (label ids or names) over `labels`.

    Returns {macro_f1, weighted_f1, accuracy, uar, macro_precision, macro_recall, n, labels,
    per_class {label: {precision, recall, f1, support}}, confusion_matrix (rows = true)}.
    """
    labels = list(labels)
    if not labels:
        raise ValueError("compute_metrics needs at least one label name")
    if len(set(labels)) != len(labels):
        raise ValueError(f"label names repeat: {labels}")
    t = _to_ids(y_true, labels, "y_true")
    p = _to_ids(y_pred, labels, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries but y_pred has {p.size}")
    return metrics_from_confusion(confusion(t, p, len(labels)), labels)


# --------------------------------------------------------------------------- files
def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """metrics.json, indented, keys in insertion order (headline first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, metrics, indent=2)  # readers never see a half-written file
    return path
