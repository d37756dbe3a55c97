"""Per-sample predictions of an evaluation, the corpus's independent unit of each sample, ensembles.

An evaluation folder (`mmer-dist eval --out DIR`, or a run folder's final evaluation) holds
metrics.json and predictions.jsonl, one row per sample:
    {"key", "label", "prediction", "probabilities": {label: p}, "group"?}
`group` is the id of the corpus's independent unit (MELD: the dialogue; RAVDESS: the actor) and
metrics.json's `unit` names it ("dialogue" | "speaker" | "utterance"). Evaluations written before
those fields existed get them from the key (`unit_from_key`, the one place that parses keys).

    p = load_predictions("runs/a/eval-test")          # Predictions: keys sorted, ids, probabilities
    check_same_samples([p, q], ["runs/a", "runs/b"])  # SampleMismatchError naming the difference
    e = ensemble([p, q])                               # mean probabilities, argmax
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmer_dist.report import load_metrics, resolve_metrics_path

PREDICTIONS = "predictions.jsonl"
_MELD_KEY = re.compile(r"^meld-(?P<split>[^-]+)-dia(?P<dia>\d+)_utt\d+$")
_RAVDESS_KEY = re.compile(r"^ravdess-\d\d-\d\d-\d\d-\d\d-\d\d-(?P<actor>\d\d)$")   # RavdessName.key


class SampleMismatchError(ValueError):
    """Prediction sets that should cover the same samples do not."""


def unit_from_key(key: str) -> tuple[str, str]:
    """(unit, group) of a sample from its key alone: MELD dialogue, RAVDESS actor, else the utterance.

    Only for evaluations written before rows carried "group" (drop once none are left)."""
    if m := _MELD_KEY.match(key):
        return "dialogue", f"{m['split']}-dia{m['dia']}"
    if m := _RAVDESS_KEY.match(key):
        return "speaker", f"actor{m['actor']}"
    return "utterance", key


@dataclass(frozen=True)
class Predictions:
    """One evaluation's predictions, sorted by key; ids index `labels`."""

    source: Path                  # the predictions.jsonl
    labels: list[str]
    keys: list[str]
    y_true: np.ndarray            # (n,) int
    probs: np.ndarray             # (n, k) float
    y_pred: np.ndarray            # (n,) int
    groups: list[str]
    unit: str
    metrics: dict[str, Any]       # the metrics.json beside it

    @property
    def split(self) -> str | None:
        return self.metrics.get("split")

    @property
    def n(self) -> int:
        return len(self.keys)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not JSON ({e}); re-run the evaluation that wrote it "
                                 f"(`mmer-dist eval ... --out {path.parent}`)") from None
            if not isinstance(row, dict) or not {"key", "label", "probabilities"} <= row.keys():
                raise ValueError(f"{path}:{lineno}: expected a row {{key, label, prediction, probabilities}} "
                                 f"written by `mmer-dist eval`")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty; re-run the evaluation that wrote it")
    return rows


def _units(rows: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> tuple[str, list[str]]:
    """The unit and each row's group: recorded ones first, else derived from the keys (all alike)."""
    if metrics.get("unit") and all("group" in r for r in rows):
        return str(metrics["unit"]), [str(r["group"]) for r in rows]
    derived = [unit_from_key(str(r["key"])) for r in rows]
    units = {u for u, _ in derived}
    if len(units) == 1:
        return units.pop(), [g for _, g in derived]
    return "utterance", [str(r["key"]) for r in rows]


def load_predictions(where: str | Path) -> Predictions:
    """Predictions of an evaluation folder, a run folder or a metrics.json (predictions.jsonl beside it)."""
    metrics_path = resolve_metrics_path(where)
    path = metrics_path.parent / PREDICTIONS
    metrics = load_metrics(metrics_path)
    if not path.is_file():
        folder = metrics_path.parent
        is_run = (folder / "config.yaml").is_file()
        split = metrics.get("split", "SPLIT")
        raise FileNotFoundError(
            f"no {PREDICTIONS} beside {metrics_path}; the paired bootstrap and ensembles need per-sample "
            f"predictions: run `mmer-dist eval --model {folder if is_run else 'RUN'} --shards SHARDS --split {split} "
            f"--out {folder / f'eval-{split}' if is_run else folder}`")
    rows = sorted(_read_rows(path), key=lambda r: str(r["key"]))
    labels = list(metrics.get("labels") or rows[0]["probabilities"].keys())
    index = {name: i for i, name in enumerate(labels)}
    bad = next((r for r in rows if r["label"] not in index or set(r["probabilities"]) != set(labels)), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad['key']} does not use the labels {labels} of {metrics_path}")
    probs = np.array([[float(r["probabilities"][name]) for name in labels] for r in rows])
    y_pred = np.array([index[r["prediction"]] if "prediction" in r else -1 for r in rows])
    y_pred = np.where(y_pred < 0, probs.argmax(axis=1), y_pred)
    unit, groups = _units(rows, metrics)
    return Predictions(source=path, labels=labels, keys=[str(r["key"]) for r in rows],
                       y_true=np.array([index[r["label"]] for r in rows]), probs=probs, y_pred=y_pred,
                       groups=groups, unit=unit, metrics=metrics)


def check_same_samples(sets: Sequence[Predictions], names: Sequence[str]) -> None:
    """Refuse sets with different labels, keys or true labels, naming how many keys differ and an example."""
    first, name0 = sets[0], names[0]
    for p, name in zip(sets[1:], names[1:]):
        if p.labels != first.labels:
            raise SampleMismatchError(f"{name} predicts labels {p.labels} but {name0} {first.labels}: "
                                      f"compare evaluations of the same corpus")
        if p.keys != first.keys:
            only_a = sorted(set(first.keys) - set(p.keys))
            only_b = sorted(set(p.keys) - set(first.keys))
            example = (only_a or only_b)[0]
            raise SampleMismatchError(
                f"{name0} ({first.n} samples, {first.source}) and {name} ({p.n} samples, {p.source}) are not "
                f"evaluations of the same samples: {len(only_a)} keys only in the first, {len(only_b)} only in "
                f"the second (e.g. {example}); evaluate both on the same split of the same shards")
        if not np.array_equal(p.y_true, first.y_true):
            i = int(np.flatnonzero(p.y_true != first.y_true)[0])
            raise SampleMismatchError(f"{name0} and {name} disagree on the true label of {p.keys[i]}: "
                                      f"they were evaluated on different shards")


def ensemble(sets: Sequence[Predictions], names: Sequence[str] | None = None) -> Predictions:
    """The members' probabilities averaged per sample; the prediction is the argmax (ties: first label)."""
    check_same_samples(sets, list(names or [str(p.source) for p in sets]))
    probs = np.mean([p.probs for p in sets], axis=0)
    return replace(sets[0], probs=probs, y_pred=probs.argmax(axis=1),
                   metrics={k: sets[0].metrics[k] for k in ("split", "labels", "unit") if k in sets[0].metrics})


def pool(sets: Sequence[Predictions]) -> Predictions:
    """Disjoint prediction sets (the folds of one seed) as one set, every sample once."""
    odd = next((p for p in sets if p.labels != sets[0].labels), None)
    if odd is not None:
        raise SampleMismatchError(f"{odd.source} predicts {odd.labels} but {sets[0].source} {sets[0].labels}: "
                                  f"folds of one sweep must share the label set")
    keys = [k for p in sets for k in p.keys]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise SampleMismatchError(f"the folds to pool share samples (e.g. {dup}): a held-out fold must hold "
                                  f"each speaker once")
    order = np.argsort(np.array(keys), kind="stable")
    groups = [g for p in sets for g in p.groups]
    cat = lambda attr: np.concatenate([getattr(p, attr) for p in sets])[order]   # noqa: E731
    return replace(sets[0], keys=[keys[i] for i in order], y_true=cat("y_true"), probs=cat("probs"),
                   y_pred=cat("y_pred"), groups=[groups[i] for i in order],
                   metrics={k: sets[0].metrics[k] for k in ("split", "labels", "unit") if k in sets[0].metrics})
