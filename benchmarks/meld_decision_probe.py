"""Is a trained MELD text model limited by its decision rule or by its features? Two probes on one run.

    .venv/bin/python benchmarks/meld_decision_probe.py --model /tmp/mmer-real/runs/meld-sqrt \
        --shards /tmp/mmer-real/shards/meld-text

1. Logit shift: dev Macro-F1 of argmax(log p - tau log prior_train) for tau in -0.5..1 (tau=0 is the
   model as exported; tau=1 targets the balanced error, Menon et al. 2021).
2. Decoupled classifier re-training (Kang et al. 2020): the fused features (the fusion CLS output that
   feeds the head) of every train and dev row, then a logistic regression re-fitted on the train
   features with no / balanced / square-root class weights, at three regularisation strengths.

Prints one line per probe setting. Every dev figure is dev-selected if you pick the best line: it
is a diagnosis, not a result (benchmarks/README.md, MELD). ~2 CPU-min for MELD (10,000 train rows).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from mmer_dist.data.build import build_eval_loader
from mmer_dist.models.encoders import build_tokenizer
from mmer_dist.train.checkpoint import load_exported


def fused_features(model_path: str, shards: str, splits: tuple[str, ...]
                   ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (features [N, width], logits [N, C], labels [N])} for every row of each split; the model
    and its tokenizer are loaded once."""
    model, model_cfg, data_cfg, _labels = load_exported(model_path)
    data_cfg = replace(data_cfg, shards=shards, num_workers=0)
    tokenizer = build_tokenizer(model_cfg.text)
    out = {}
    for split in splits:
        feats, logits, labels = [], [], []
        with torch.no_grad():
            for batch in build_eval_loader(shards, data_cfg, tokenizer, split=split):
                f = model.fusion(model.encode(batch))
                feats.append(f)
                logits.append(model.head(f))
                labels.append(batch["labels"])
        out[split] = (torch.cat(feats).numpy(), torch.cat(logits).numpy(), torch.cat(labels).numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a finished run folder or exported model")
    parser.add_argument("--shards", required=True, help="the MELD shards it was trained on (train and dev splits)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    by_split = fused_features(args.model, args.shards, ("train", "dev"))
    (f_train, _, y_train), (f_dev, z_dev, y_dev) = by_split["train"], by_split["dev"]
    n_classes = z_dev.shape[1]
    counts = np.bincount(y_train, minlength=n_classes).astype(float)
    log_prior = np.log(np.maximum(counts, 1.0) / counts.sum())

    def macro_f1(pred: np.ndarray) -> float:
        return float(f1_score(y_dev, pred, average="macro", labels=list(range(n_classes)), zero_division=0))

    log_p = z_dev - np.logaddexp.reduce(z_dev, axis=1, keepdims=True)
    for tau in (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0):
        print(f"logit shift tau={tau:+.2f}: dev Macro-F1 {macro_f1((log_p - tau * log_prior).argmax(1)):.4f}")
    sqrt_weights = {c: float(np.sqrt(counts.max() / max(counts[c], 1.0))) for c in range(n_classes)}
    for name, weights in (("none", None), ("balanced", "balanced"), ("sqrt", sqrt_weights)):
        for c in (0.01, 0.1, 1.0):
            clf = LogisticRegression(C=c, class_weight=weights, max_iter=2000).fit(f_train, y_train)
            print(f"re-fitted classifier, class weights {name}, C={c}: dev Macro-F1 "
                  f"{macro_f1(clf.predict(f_dev)):.4f}")


if __name__ == "__main__":
    main()
