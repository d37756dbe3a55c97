"""Evaluation of a model over a rank loader: the one evaluator of training and `mmer-dist eval`.

    result = evaluate(model, eval_loader, device, criterion=loss_fn)     # a collective: every rank
    result.metrics["macro_f1"], result.metrics["loss"]

Each rank predicts its share of the split (mmer_dist.data: every sample exactly once over the ranks,
padding repeats flagged in `batch["pad"]`); `EvalAccumulator.gather` merges the ranks, drops the
padding, checks that the split's keys are covered exactly once and computes the metrics, so 1 and N
processes give identical numbers. The reported loss is the training criterion itself (its
`sample_terms`, summed over the whole split), so train and dev losses are the same quantity.
"""

from __future__ import annotations

from typing import Any

import torch

from mmer_dist.train.metrics import EvalAccumulator, EvalResult


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on `device`; bookkeeping (keys, counts) unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, criterion: Any = None) -> EvalResult:
    """Predict over this rank's part of `loader`'s split and gather: every sample exactly once, padding
    duplicates dropped, the same `EvalResult` on every rank. `criterion`: the training loss (its
    `sample_terms` give metrics["loss"]); None = no loss."""
    was_training = model.training
    model.eval()
    acc = EvalAccumulator(loader.label_names)
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            logits = model(batch).float()
            terms = criterion.sample_terms(logits, batch["labels"]) if criterion is not None else None
            acc.add(batch["keys"], batch["labels"].cpu(), torch.softmax(logits, -1).cpu(),
                    is_padding=batch["pad"].cpu() if "pad" in batch else None,
                    losses=terms[0].cpu() if terms is not None else None,
                    loss_weights=terms[1].cpu() if terms is not None else None)
    result = acc.gather(expected_keys=getattr(loader, "keys", None))
    model.train(was_training)
    return result
