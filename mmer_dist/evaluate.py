"""`mmer-dist eval`: a trained model on one split of a shards folder -> metrics, predictions, plots.

Runs on any number of processes (each sample counted exactly once; padding duplicates are
dropped before the reduction), so 1 and N processes write the identical metrics.json:

    mmer-dist eval --model runs/debug --shards shards/out/synth --split test --out runs/debug/eval-test
    torchrun --nproc_per_node 2 -m mmer_dist.evaluate --model runs/debug --shards ... --split test --out ...

Writes OUT/metrics.json (macro_f1 headline, weighted_f1, accuracy, uar, per_class, confusion
matrix), OUT/predictions.jsonl, OUT/confusion.png, OUT/per_class_f1.png and, when the model comes
from a run folder with logs, OUT/curves.png; prints a table.

    mmer-dist eval --model runs/seed0 runs/seed1 runs/seed2 --shards S --split test --out ens   # an ensemble

Several models: each member is evaluated into OUT/members/N, then their rows (the same samples in the
same split order) are combined by averaging the probabilities, in one streaming pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmer-dist eval",
        description="Evaluate a trained model on one split: metrics.json (macro-F1 headline), predictions.jsonl "
                    "and plots in --out. Runs on any number of processes (torchrun --nproc_per_node N "
                    "-m mmer_dist.evaluate ...) with identical metrics.")
    p.add_argument("--model", required=True, nargs="+",
                   help="run folder (uses its exported best model), exported model folder, or a checkpoint folder "
                        "RUN/checkpoints/step-N; several: their ensemble (the average of the members' probabilities), "
                        "each member also evaluated in OUT/members/N")
    p.add_argument("--shards", required=True, help="shards folder or URL (s3://, gs://, http(s)://, file://, "
                                                   "pipe:CMD with {shard}); a URL is streamed")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.jsonl and the plots")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size per process (default: 32)")
    return p


def evaluate_model(model_path: str | Path, shards: str | Path, split: str, out: str | Path,
                   batch_size: int = 32) -> dict[str, Any]:
    """Evaluate on this process's part of the split; every rank returns the same metrics."""
    import torch

    from mmer_dist import dist
    from mmer_dist.config import replace
    from mmer_dist.data.build import build_eval_loader, shards_location
    from mmer_dist.models import build_tokenizer
    from mmer_dist.models.cached import check_embeddings
    from mmer_dist.report import print_table, write_eval_report
    from mmer_dist.shards.schema import load_index
    from mmer_dist.train.checkpoint import find_export, load_exported, run_dir_of, selected_on
    from mmer_dist.train.evaluation import evaluate
    from mmer_dist.train.metrics import write_metrics

    info = dist.init_process_group()
    export_dir = find_export(model_path)
    model, model_cfg, data_cfg, labels = load_exported(export_dir)
    location = shards_location(data_cfg, shards)
    index = load_index(location)
    check_embeddings(index.extra, model_cfg, data_cfg.modalities, shards)   # cached model <-> embeddings of its encoder
    if list(index.labels) != labels:
        raise ValueError(f"the model predicts {labels} but {shards} is labelled {list(index.labels)}; "
                         f"evaluate on shards of the corpus (label set) the model was trained on")
    data_cfg = replace(data_cfg, shards=str(shards), eval_batch_size=batch_size)
    tokenizer = build_tokenizer(model_cfg.text) if "text" in data_cfg.modalities else None
    loader = build_eval_loader(str(shards), data_cfg, tokenizer, split=split, rank=info.rank,
                               world_size=info.world_size, index=index)
    out = Path(out)
    metrics = evaluate(model, loader, torch.device("cpu"), predictions=out).metrics
    metrics.update({"split": split, "shards": location.shown(), "model": str(export_dir),
                    "selected_on": selected_on(export_dir)})
    if dist.is_main():
        write_metrics(metrics, out / "metrics.json")
        run_dir = run_dir_of(export_dir)
        write_eval_report(metrics, out, run_dir if (run_dir / "log.jsonl").exists() else None)
        print(print_table(metrics))
        print(f"\nwrote {out / 'metrics.json'}, predictions.jsonl and plots "
              f"({', '.join(sorted(p.name for p in out.glob('*.png')))}) in {out}")
    dist.barrier()
    return metrics


def average_predictions(parts: list[Path], out: Path, labels: list[str]) -> dict[str, Any]:
    """Combine members' predictions.jsonl (same samples, same order) by averaging probabilities; write
    out/predictions.jsonl; the metrics of the average (streaming: one row of each file at a time)."""
    import json

    import numpy as np

    from mmer_dist.train.metrics import metrics_from_confusion

    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    files = [open(p, encoding="utf-8") for p in parts]
    try:
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for lines in zip(*files, strict=True):
                rows = [json.loads(x) for x in lines]
                if len({r["key"] for r in rows}) != 1:
                    raise ValueError(f"the members' predictions disagree on the sample ({rows[0]['key']} vs "
                                     f"{rows[1]['key']}): evaluate them on the same shards and split")
                probs = np.mean([[r["probabilities"][name] for name in labels] for r in rows], axis=0)
                pred = int(probs.argmax())
                cm[labels.index(rows[0]["label"]), pred] += 1
                f.write(json.dumps({**rows[0], "prediction": labels[pred],
                                    "probabilities": dict(zip(labels, probs.tolist()))}) + "\n")
    finally:
        for fh in files:
            fh.close()
    return metrics_from_confusion(cm, labels)


def evaluate_ensemble(models: list[str | Path], shards: str | Path, split: str, out: str | Path,
                      batch_size: int = 32) -> dict[str, Any]:
    """Evaluate every member into out/members/N, then their average; every rank returns the metrics."""
    from mmer_dist import dist
    from mmer_dist.report import print_table, write_eval_report
    from mmer_dist.train.metrics import write_metrics

    out = Path(out)
    members = [evaluate_model(m, shards, split, out / "members" / str(i), batch_size) for i, m in enumerate(models)]
    labels = list(members[0]["labels"])
    if any(list(m["labels"]) != labels for m in members):
        raise ValueError(f"the models predict different label sets ({[m['labels'] for m in members]}); an ensemble "
                         f"needs models of one corpus")
    metrics: dict[str, Any] = {}
    if dist.is_main():
        metrics = average_predictions([out / "members" / str(i) / "predictions.jsonl" for i in range(len(models))],
                                      out, labels)
        chosen = sorted({m["selected_on"] for m in members if m.get("selected_on")})   # none: no member was chosen
        metrics.update({"split": split, "shards": str(shards), "unit": members[0].get("unit", "utterance"),
                        "selected_on": ",".join(chosen) or None,
                        "ensemble": [m["model"] for m in members],
                        "members": [{k: m[k] for k in ("model", "macro_f1", "weighted_f1", "accuracy", "uar")}
                                    for m in members]})
        write_metrics(metrics, out / "metrics.json")
        write_eval_report(metrics, out, None)
        print(f"\nensemble of {len(models)} models:\n{print_table(metrics)}")
    return dist.broadcast_object(metrics)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mmer_dist.data.loader import DataError

    try:
        if len(args.model) > 1:
            evaluate_ensemble(args.model, args.shards, args.split, args.out, args.batch_size)
        else:
            evaluate_model(args.model[0], args.shards, args.split, args.out, args.batch_size)
    except (OSError, KeyError, ValueError) as e:   # ConfigError is a ValueError; unreadable URLs are OSErrors
        print(f"mmer-dist eval: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except DataError as e:                 # a shard that cannot be read or is damaged: named, no traceback
        print(f"mmer-dist eval: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
