"""Evaluation of a model over a rank loader: the one evaluator of training and `mmer-dist eval`.

    result = evaluate(model, eval_loader, device, criterion=loss_fn)     # a collective: every rank
    result.metrics["macro_f1"], result.metrics["loss"]
    result = evaluate(model, eval_loader, device, predictions=out_dir)   # + out_dir/predictions.jsonl

Each rank predicts its share of the split (mmer_dist.data: every sample exactly once over the ranks,
padding repeats flagged in `batch["pad"]`) and keeps only sums: the confusion matrix, the loss terms,
the count and an order-free digest of the positions it covered (predicted or skipped). One all-reduce
adds them up, so memory per rank does not grow with the split, nothing is gathered, and 1 and N
processes give identical metrics. The coverage is checked exactly: count == split size and digest ==
the digest of 0..n-1, else `EvalCoverageError`. With `predictions`, every rank streams its rows to
a file of its own in that folder and the main rank merges them in split order (predictions.jsonl), so
the folder must be shared by the ranks (it is on a cluster's shared filesystem).

The reported loss is the training criterion itself (its `sample_terms`, summed over the whole split),
so train and dev losses are the same quantity.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmer_dist import dist
from mmer_dist.data.seeds import add_digests, multiset_digest, range_digest
from mmer_dist.train.metrics import metrics_from_confusion

PREDICTIONS = "predictions.jsonl"


class EvalCoverageError(RuntimeError):
    """The ranks' eval rows do not cover the split exactly once (a loader bug, never a data fault)."""


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on `device`; bookkeeping (keys, counts) unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class EvalResult:
    """The metrics of one evaluation and, when rows were written, the merged predictions file."""

    metrics: dict[str, Any]
    predictions: Path | None = None


@dataclass
class EvalAccumulator:
    """This rank's running sums of an evaluation; `reduce()` adds up every rank's (a collective)."""

    labels: list[str]
    rows_path: Path | None = None            # this rank's prediction rows, streamed
    group_unit: str = "utterance"
    cm: np.ndarray = field(init=False)
    count: int = 0
    loss: list[float] = field(default_factory=lambda: [0.0, 0.0])      # sum of terms, sum of weights
    digest: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.cm = np.zeros((len(self.labels), len(self.labels)), dtype=np.int64)
        self._rows = open(self.rows_path, "w", encoding="utf-8") if self.rows_path is not None else None

    def add(self, batch: dict[str, Any], probs: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor] | None = None,
            groups: np.ndarray | None = None, speakers: list[str] | None = None) -> None:
        """One collated batch: `probs` [B, K]; `terms` the criterion's (terms, weights); `groups`/`speakers`
        of its samples (for the rows)."""
        real = ~batch["pad"].cpu().numpy().astype(bool)
        positions = batch["index"].cpu().numpy()[real]
        y = batch["labels"].cpu().numpy()[real]
        p = probs.detach().float().cpu().numpy()[real]
        pred = p.argmax(axis=1) if p.size else np.zeros(0, dtype=np.int64)
        k = len(self.labels)
        self.cm += np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        self.count += int(real.sum())
        skipped = np.asarray(batch.get("skipped_index", []), dtype=np.int64)
        self.digest = add_digests(self.digest, add_digests(multiset_digest(positions), multiset_digest(skipped)))
        self.skipped.update(batch.get("skipped", {}))
        if terms is not None:
            self.loss[0] += math.fsum(terms[0].detach().double().cpu().numpy()[real].tolist())
            self.loss[1] += math.fsum(terms[1].detach().double().cpu().numpy()[real].tolist())
        if self._rows is not None:
            keys = [key for key, r in zip(batch["keys"], real) if r]
            for j, i in enumerate(positions.tolist()):
                row = {"index": i, "key": keys[j], "label": self.labels[y[j]], "prediction": self.labels[pred[j]],
                       "probabilities": {name: float(v) for name, v in zip(self.labels, p[j])}}
                if groups is not None and self.group_unit != "utterance":
                    row["group"] = int(groups[j])
                if speakers is not None:
                    row["speaker"] = speakers[j]
                self._rows.write(json.dumps(row) + "\n")

    def reduce(self, n: int) -> dict[str, Any]:
        """The split's metrics from every rank's sums (a collective), after checking the coverage of 0..n-1."""
        if self._rows is not None:
            self._rows.close()
        reasons = sorted(self.skipped)
        gathered = dist.all_gather_object(reasons)            # a few names: skip reasons can differ per rank
        reasons = sorted({r for rs in gathered for r in rs})
        ints = torch.tensor([*self.cm.ravel().tolist(), self.count, self.digest,
                             *(self.skipped.get(r, 0) for r in reasons)], dtype=torch.int64)
        ints = dist.all_reduce_sum(ints)                      # int64 sums wrap like the digest's uint64
        loss = dist.all_reduce_sum(torch.tensor(self.loss, dtype=torch.float64))
        k = len(self.labels)
        cm, count, digest = ints[: k * k].numpy().reshape(k, k), int(ints[k * k]), int(ints[k * k + 1])
        skipped = {r: int(v) for r, v in zip(reasons, ints[k * k + 2:].tolist()) if v}
        if count + sum(skipped.values()) != n or digest != range_digest(n):
            raise EvalCoverageError(f"the ranks evaluated {count} samples and skipped {sum(skipped.values())} of a "
                                    f"split of {n}, or not each exactly once (position digest {digest} != "
                                    f"{range_digest(n)}): the eval loader's division over ranks is broken")
        if count == 0:
            raise EvalCoverageError(f"no sample of the split could be evaluated: all {n} were skipped ({skipped})")
        metrics = metrics_from_confusion(cm, self.labels)
        if float(loss[1]) > 0:
            metrics["loss"] = float(loss[0] / loss[1])
        metrics["skipped"] = skipped
        metrics["unit"] = self.group_unit
        return metrics


def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, criterion: Any = None,
             predictions: Path | None = None) -> EvalResult:
    """Predict over this rank's part of `loader`'s split and add up the ranks: every sample exactly once,
    padding duplicates dropped, the same metrics on every rank. `criterion`: the training loss (its
    `sample_terms` give metrics["loss"]); `predictions`: a folder (shared by the ranks) for predictions.jsonl."""
    rank = dist.rank()
    rows = Path(predictions) / f".predictions.rank{rank}.jsonl" if predictions is not None else None
    if rows is not None:
        rows.parent.mkdir(parents=True, exist_ok=True)
    acc = EvalAccumulator(loader.label_names, rows, loader.group_unit)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            logits = model(batch).float()
            terms = criterion.sample_terms(logits, batch["labels"]) if criterion is not None else None
            positions = batch["index"].cpu().numpy()
            groups = loader.samples["group"][positions] if rows is not None else None
            speakers = ([loader.speakers[s] if s >= 0 else "" for s in loader.samples["speaker"][positions]]
                        if rows is not None else None)
            acc.add(batch, torch.softmax(logits, -1), terms, groups, speakers)
    model.train(was_training)
    metrics = acc.reduce(loader.num_samples)
    if rows is None:
        return EvalResult(metrics)
    dist.barrier()                        # every rank's rows are on disk
    merged = Path(predictions) / PREDICTIONS
    if dist.is_main():
        merge_rows([Path(predictions) / f".predictions.rank{r}.jsonl" for r in range(dist.world_size())], merged)
    dist.barrier()
    return EvalResult(metrics, merged)


def _in_order(part: Path) -> None:
    """Sort a rank's row file by split position unless it already is (a streaming loader's workers interleave
    their batches; the map-style loader's rows come in order): this rank's rows in memory, once."""
    with open(part, encoding="utf-8") as f:
        positions = [json.loads(x)["index"] for x in f]
    if all(a < b for a, b in zip(positions, positions[1:])):
        return
    lines = part.read_text(encoding="utf-8").splitlines(keepends=True)
    part.write_text("".join(line for _, line in sorted(zip(positions, lines))), encoding="utf-8")


def merge_rows(parts: list[Path], out: Path) -> None:
    """Merge the ranks' row files into `out` in split order (each sorted first if needed); delete them."""
    for part in parts:
        _in_order(part)
    files = [open(p, encoding="utf-8") for p in parts]
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for _, line in heapq.merge(*(((json.loads(x)["index"], x) for x in fh) for fh in files)):
                f.write(line)
    finally:
        for fh in files:
            fh.close()
    tmp.replace(out)
    for p in parts:
        p.unlink(missing_ok=True)
