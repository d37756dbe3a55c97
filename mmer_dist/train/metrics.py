"""Classification metrics of an eval split, and the accumulator that gathers them across ranks.

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

`EvalAccumulator` collects one row per sample on each rank during distributed evaluation
(key, label, prediction, probabilities, whether the row is a padding duplicate that only
exists so every rank runs the same number of steps). `gather()` collects all ranks' rows,
drops the padding, checks that each key occurs exactly once, sorts by key and computes
the metrics: the result is identical for 1 and N processes.

    acc = EvalAccumulator(labels)
    for batch in loader:
        logits = model(batch)
        acc.add(batch["keys"], batch["labels"], logits.softmax(-1), is_padding=batch["pad"])
    result = acc.gather()                      # every rank calls it (collective)
    if dist.is_main():
        result.write(out_dir)                  # metrics.json + predictions.jsonl
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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


# --------------------------------------------------------------------------- accumulator
class EvalGatherError(RuntimeError):
    """The gathered eval rows do not cover the split exactly once (a sampler/loader bug)."""


@dataclass
class EvalResult:
    """What `EvalAccumulator.gather` returns: metrics plus the per-sample rows, sorted by key."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]                       # {key, label, prediction, probabilities{label: p}}
    padding_dropped: int = 0
    ranks: int = 1

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write OUT/metrics.json and OUT/predictions.jsonl (call on the main rank only)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"metrics": out / "metrics.json", "predictions": out / "predictions.jsonl"}
        write_metrics(self.metrics, paths["metrics"])
        write_predictions(self.rows, paths["predictions"])
        return paths


@dataclass
class EvalAccumulator:
    """Per-rank collector of eval rows; `gather()` merges all ranks and computes the metrics."""

    labels: Sequence[str]
    keys: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    preds: list[int] = field(default_factory=list)
    probs: list[list[float]] = field(default_factory=list)
    padding: list[bool] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    loss_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        if not self.labels:
            raise ValueError("EvalAccumulator needs the label names")

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[str], labels: Any, probs: Any, *, preds: Any = None,
            is_padding: Any = None, losses: Any = None, loss_weights: Any = None) -> None:
        """Record one batch. `probs` [B, K] (softmax of the logits); `preds` default to its argmax;
        `is_padding` [B] marks duplicates added only to even out the ranks' steps (default: none);
        `losses` [B] optional per-sample loss terms, `loss_weights` [B] their weights (default 1):
        sum(terms) / sum(weights) over the real samples becomes metrics["loss"]."""
        b = len(keys)
        p = _to_numpy(probs).astype(np.float64)
        k = len(self.labels)
        if p.shape != (b, k):
            raise ValueError(f"probs has shape {p.shape}, expected ({b}, {k}) for {b} keys and {k} labels")
        t = _to_ids(labels, self.labels, "labels")
        pr = np.argmax(p, axis=1) if preds is None else _to_ids(preds, self.labels, "preds")
        pad = np.zeros(b, dtype=bool) if is_padding is None else _to_numpy(is_padding).astype(bool).reshape(-1)
        if not (t.size == pr.size == pad.size == b):
            raise ValueError(f"batch sizes disagree: {b} keys, {t.size} labels, {pr.size} preds, {pad.size} padding flags")
        if losses is not None:
            lo = _to_numpy(losses).astype(np.float64).reshape(-1)
            if lo.size != b:
                raise ValueError(f"losses has {lo.size} entries for {b} keys")
            if len(self.losses) != len(self.keys):
                raise ValueError("per-sample losses must be given for every batch or for none")
            self.losses.extend(lo.tolist())
            lw = np.ones(b) if loss_weights is None else _to_numpy(loss_weights).astype(np.float64).reshape(-1)
            if lw.size != b:
                raise ValueError(f"loss_weights has {lw.size} entries for {b} keys")
            self.loss_weights.extend(lw.tolist())
        elif self.losses:
            raise ValueError("per-sample losses must be given for every batch or for none")
        self.keys.extend(str(x) for x in keys)
        self.targets.extend(t.tolist())
        self.preds.extend(pr.tolist())
        self.probs.extend(p.tolist())
        self.padding.extend(pad.tolist())

    def payload(self) -> dict[str, Any]:
        """This rank's rows as plain Python objects (what travels through all_gather_object)."""
        return {"labels": list(self.labels), "keys": list(self.keys), "targets": list(self.targets),
                "preds": list(self.preds), "probs": [list(r) for r in self.probs],
                "padding": list(self.padding), "losses": list(self.losses),
                "loss_weights": list(self.loss_weights)}

    def gather(self, gathered: Sequence[Mapping[str, Any]] | None = None,
               expected_keys: Iterable[str] | None = None) -> EvalResult:
        """Merge every rank's rows and compute the metrics (a collective: call on every rank).

        `gathered`: the ranks' payloads, already collected (tests, or a caller that gathers
        itself); default: `mmer_dist.dist.all_gather_object(self.payload())`.
        `expected_keys`: the split's keys; when given, a missing or unexpected key is an error.
        Every rank receives the same result; write files on the main rank only.
        """
        if gathered is None:
            from mmer_dist import dist  # torch is imported only when a real gather happens

            gathered = dist.all_gather_object(self.payload())
        return merge_payloads(gathered, self.labels, expected_keys)


def merge_payloads(gathered: Sequence[Mapping[str, Any]], labels: Sequence[str],
                   expected_keys: Iterable[str] | None = None) -> EvalResult:
    """Drop padding rows, check every key occurs exactly once, sort by key, compute metrics."""
    labels = list(labels)
    rows: list[tuple[str, int, int, list[float], float | None, float]] = []
    dropped = 0
    with_loss = 0
    for rank, pl in enumerate(gathered):
        if list(pl["labels"]) != labels:
            raise EvalGatherError(f"rank {rank} evaluated with labels {list(pl['labels'])}, rank 0 with {labels}")
        n = len(pl["keys"])
        losses = pl.get("losses") or []
        weights = pl.get("loss_weights") or [1.0] * len(losses)
        if losses:
            with_loss += 1
        for i in range(n):
            if pl["padding"][i]:
                dropped += 1
                continue
            rows.append((pl["keys"][i], int(pl["targets"][i]), int(pl["preds"][i]), pl["probs"][i],
                         float(losses[i]) if losses else None, float(weights[i]) if losses else 1.0))
    if 0 < with_loss < sum(1 for pl in gathered if pl["keys"]):
        raise EvalGatherError("some ranks recorded per-sample losses and others did not")

    counts = Counter(r[0] for r in rows)
    dups = sorted(k for k, c in counts.items() if c > 1)
    if dups:
        raise EvalGatherError(
            f"{len(dups)} eval keys were counted more than once across {len(gathered)} ranks "
            f"(first: {dups[:5]}); padding duplicates must be flagged is_padding=True, and each "
            f"sample must be assigned to exactly one rank")
    if expected_keys is not None:
        expected = set(expected_keys)
        missing = sorted(expected - counts.keys())
        extra = sorted(counts.keys() - expected)
        if missing or extra:
            raise EvalGatherError(
                f"eval rows do not cover the split exactly once: {len(missing)} keys missing "
                f"(first: {missing[:5]}), {len(extra)} unexpected (first: {extra[:5]}); "
                f"{len(rows)} rows from {len(gathered)} ranks, {len(expected)} keys expected")
    if not rows:
        raise EvalGatherError(f"no eval rows from {len(gathered)} ranks ({dropped} padding rows dropped): "
                              f"the eval split is empty or every row was flagged as padding")

    rows.sort(key=lambda r: r[0])
    metrics = compute_metrics([r[1] for r in rows], [r[2] for r in rows], labels)
    if rows[0][4] is not None:
        metrics["loss"] = float(math.fsum(r[4] for r in rows) / math.fsum(r[5] for r in rows))  # type: ignore[misc]
    out_rows = [{"key": key, "label": labels[t], "prediction": labels[p],
                 "probabilities": {name: float(pr[j]) for j, name in enumerate(labels)}}
                for key, t, p, pr, _, _ in rows]
    return EvalResult(metrics=metrics, rows=out_rows, padding_dropped=dropped, ranks=len(gathered))


# --------------------------------------------------------------------------- files
def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """metrics.json, indented, keys in insertion order (headline first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, metrics, indent=2)  # readers never see a half-written file
    return path


def write_predictions(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """predictions.jsonl: one {key, label, prediction, probabilities{label: p}} per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path
