"""`mmer-dist summarize SWEEP`: mean, standard deviation and 95% interval over a sweep's runs, and its ensemble.

    mmer-dist summarize runs/sweep                 # the test split when every run has one, else dev
    mmer-dist summarize runs/sweep --split dev --json

Writes SWEEP/summary.json and SWEEP/summary.png and prints a table. summary.json:
    {"sweep", "runs": N, "split", "metrics": {"macro_f1": {"n", "mean", "std", "ci95": [lo, hi]}, ...},
     "per_class": {label: {"f1": {...}}}, "ensemble": {"members", "metrics": {...}, "per_class": {...}},
     "pooled" (fold sweeps: each seed's folds pooled, every sample once; "bootstrap": percentile intervals
     of the pooled figures resampling the speakers, stats.cluster_bootstrap), "selection", "missing",
     "other_splits": {"dev": {the same block for dev}}}
The figures of one split come only from that split's evaluations (a run's own metrics.json holds its
final evaluation on the split it selected on, RUN/eval-SPLIT/ any other), so dev and test never mix.
Intervals: Student t over runs (mmer_dist.experiments.stats.describe); one run gets none. A sweep
whose grid varies an override gets one block per variant under "variants".

The ensemble averages the member runs' probabilities per sample (their predictions.jsonl) and is
scored like a run; in a fold sweep each fold's seeds are averaged and the folds pooled.
Selection: every run records the split its checkpoint was chosen on (`selected_on`; for runs that
predate the field: their config's data.eval_split with train.select=best). A split on which any
run's checkpoint was chosen is flagged in "selection", the table and the plot: its figures are
optimistic.

summary.png: per-class F1 (mean bar, 95% interval, each run a dot, the ensemble a diamond), one
panel per split.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mmer_dist.experiments.predictions import Predictions

SPLITS = ("dev", "test")


@dataclass(frozen=True)
class SweepRun:
    name: str
    seed: int
    fold: int | None
    variant: str           # "" or "key=value, ..."
    path: Path


def sweep_runs(sweep: Path) -> list[SweepRun]:
    """The runs recorded in SWEEP/sweep.json, in grid order."""
    from mmer_dist.experiments.sweep import read_sweep

    runs = read_sweep(sweep)["runs"]
    return [SweepRun(r["name"], int(r["seed"]), r.get("fold"),
                     ", ".join(f"{k}={v}" for k, v in (r.get("variant") or {}).items()), sweep / r["name"])
            for r in runs]


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    """RUN/metrics.json ({} before the training finished); a damaged file is an error naming it."""
    from mmer_dist.report import load_metrics

    return load_metrics(run_dir) if (run_dir / "metrics.json").is_file() else {}


def evaluation_dir(run_dir: Path, split: str) -> Path | None:
    """Where a run's evaluation on `split` is: RUN/eval-SPLIT, else RUN itself when its final evaluation
    was on that split; None when it has none."""
    from mmer_dist.experiments.sweep import evaluated

    if evaluated(run_dir / f"eval-{split}"):
        return run_dir / f"eval-{split}"
    return run_dir if _run_metrics(run_dir).get("split") == split else None


def selected_on(run_dir: Path, metrics: dict[str, Any]) -> str | None:
    """The split the run's checkpoint was chosen on (None: no choice, train.select=last). Recorded as
    `selected_on` by the evaluation or the run; for runs before that field: the config's data.eval_split
    when train.select=best."""
    import yaml

    run = _run_metrics(run_dir)
    for m in (metrics, run):
        if "selected_on" in m:
            return m["selected_on"]
    config = run_dir / "config.yaml"
    try:
        cfg = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}) if config.is_file() else {}
    except yaml.YAMLError as e:
        raise ValueError(f"{config} is not valid YAML ({e}); it is the run's resolved config, written by "
                         f"`mmer-dist train`: restore it or re-run the training") from None
    if (cfg.get("train") or {}).get("select", "best") == "last":
        return None
    return (cfg.get("data") or {}).get("eval_split") or run.get("split")


# --------------------------------------------------------------------------- scoring
def score(pred: "Predictions") -> dict[str, Any]:
    """Metrics of a prediction set, as a run's metrics.json holds them."""
    from mmer_dist.train.metrics import HEADLINE, compute_metrics

    m = compute_metrics(pred.y_true, pred.y_pred, pred.labels)
    return {"n": m["n"], "metrics": {k: m[k] for k in HEADLINE},
            "per_class": {name: {"f1": c["f1"], "support": c["support"]} for name, c in m["per_class"].items()}}


def spread_block(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """describe() of every headline metric and every class's F1 over the given metrics dictionaries."""
    from mmer_dist.experiments.stats import describe
    from mmer_dist.train.metrics import HEADLINE

    labels = list(metrics[0]["per_class"])
    return {"metrics": {k: describe([m[k] for m in metrics]).to_json() for k in HEADLINE if all(k in m for m in metrics)},
            "per_class": {name: {"f1": describe([m["per_class"][name]["f1"] for m in metrics]).to_json()}
                          for name in labels}}


def _folds(runs: Sequence[SweepRun]) -> dict[Any, list[SweepRun]]:
    out: dict[Any, list[SweepRun]] = {}
    for r in runs:
        out.setdefault(r.fold, []).append(r)
    return out


def _predictions(runs: Sequence[SweepRun], dirs: dict[str, Path]) -> dict[str, "Predictions"] | str:
    """Each run's predictions, or the reason they cannot be had."""
    from mmer_dist.experiments.predictions import load_predictions

    try:
        return {r.name: load_predictions(dirs[r.name]) for r in runs}
    except FileNotFoundError as e:
        return str(e)


def _disjoint(sets: Sequence["Predictions"]) -> bool:
    keys = [k for p in sets for k in p.keys]
    return len(set(keys)) == len(keys)


def ensemble_block(runs: Sequence[SweepRun], preds: dict[str, "Predictions"] | str) -> dict[str, Any]:
    """The members' mean probabilities per sample, scored; fold sweeps: per fold, then pooled (held-out
    folds are disjoint; dev sets carved from each fold's training speakers may not be: scored per fold)."""
    from mmer_dist.experiments.predictions import ensemble, pool

    if isinstance(preds, str):
        return {"note": preds}
    groups = _folds(runs)
    per_fold = {fold: ensemble([preds[r.name] for r in members], [r.name for r in members])
                for fold, members in groups.items()}
    members = len(runs) // len(groups)
    out: dict[str, Any] = {"members": members}
    if len(groups) == 1:
        out.update(score(next(iter(per_fold.values()))))
    elif _disjoint(list(per_fold.values())):
        out.update({"folds": len(groups), **score(pool(list(per_fold.values())))})
    else:
        out.update({"folds": len(groups), "per_fold": {str(f): score(e) for f, e in per_fold.items()},
                    "note": "the folds' samples overlap (dev carved from each fold's training speakers): "
                            "each fold's ensemble is scored on its own"})
    if members == 1:
        out["note"] = "one member per fold: the ensemble is the run itself"
    return out


def pooled_block(runs: Sequence[SweepRun], preds: dict[str, "Predictions"] | str) -> dict[str, Any] | None:
    """Fold sweeps on held-out folds: each seed's folds pooled (every sample tested once), scored,
    described over seeds. None without folds or when the folds' samples overlap (dev)."""
    from mmer_dist.experiments.predictions import pool
    from mmer_dist.experiments.stats import cluster_bootstrap

    if len(_folds(runs)) < 2:
        return None
    if isinstance(preds, str):
        return {"note": preds}
    seeds = sorted({r.seed for r in runs})
    by_seed = {s: [preds[r.name] for r in runs if r.seed == s] for s in seeds}
    if not all(_disjoint(sets) for sets in by_seed.values()):
        return None
    pooled = [pool(sets) for sets in by_seed.values()]
    scored = [{**m["metrics"], "per_class": m["per_class"]} for m in map(score, pooled)]
    out = {"seeds": len(seeds), "n": pooled[0].n, **spread_block(scored)}
    if all(p.keys == pooled[0].keys for p in pooled):       # intervals over the independent units (speakers)
        first = pooled[0]
        out["bootstrap"] = cluster_bootstrap(first.y_true, [p.y_pred for p in pooled], first.groups, first.labels,
                                             unit=first.unit)
    return out


def selection_block(runs: Sequence[SweepRun], metrics: dict[str, dict[str, Any]], split: str) -> dict[str, Any]:
    """Which split each run's checkpoint was chosen on; the runs chosen on `split` are flagged."""
    chosen = {r.name: selected_on(r.path, metrics[r.name]) for r in runs}
    flagged = [name for name, s in chosen.items() if s == split]
    out: dict[str, Any] = {"selected_on": chosen, "chosen_on_this_split": flagged}
    if flagged:
        out["warning"] = (f"the checkpoint of {len(flagged)} of {len(runs)} runs was chosen on {split}: these {split} "
                          f"figures are optimistic; quote a split no choice was made on")
    return out


def split_block(runs: Sequence[SweepRun], split: str) -> dict[str, Any] | None:
    """Everything about one split of one variant; None when no run has an evaluation on it."""
    from mmer_dist.report import load_metrics

    dirs = {r.name: d for r in runs if (d := evaluation_dir(r.path, split)) is not None}
    have = [r for r in runs if r.name in dirs]
    if not have:
        return None
    metrics = {r.name: load_metrics(dirs[r.name]) for r in have}
    preds = _predictions(have, dirs)            # read once: the ensemble and the pooled folds both use them
    block: dict[str, Any] = {"runs": len(have), **spread_block([metrics[r.name] for r in have]),
                             "ensemble": ensemble_block(have, preds)}
    pooled = pooled_block(have, preds)
    if pooled is not None:
        block["pooled"] = pooled
    block["selection"] = selection_block(have, metrics, split)
    block["per_run"] = {name: {"macro_f1": m["macro_f1"], "f1": {c: v["f1"] for c, v in m["per_class"].items()}}
                        for name, m in metrics.items()}
    block["missing"] = [r.name for r in runs if r.name not in dirs]
    block["evaluations"] = {name: str(d) for name, d in dirs.items()}
    return block


def variant_block(runs: Sequence[SweepRun], split: str | None) -> dict[str, Any]:
    blocks = {s: b for s in SPLITS if (b := split_block(runs, s)) is not None}
    if not blocks:
        raise FileNotFoundError(f"no run of the sweep has a dev or test evaluation yet (looked in "
                                f"{runs[0].path}/metrics.json and eval-*/); run `mmer-dist sweep` to finish them")
    chosen = split or ("test" if "test" in blocks and not blocks["test"]["missing"] else next(iter(blocks)))
    if chosen not in blocks:
        raise FileNotFoundError(f"no run of the sweep has a {chosen} evaluation (present: {', '.join(blocks)}); "
                                f"finish the sweep (`mmer-dist sweep` with its arguments) or choose --split")
    return {"split": chosen, **blocks[chosen], "other_splits": {s: b for s, b in blocks.items() if s != chosen}}


def summarize(sweep: str | Path, split: str | None = None) -> dict[str, Any]:
    """The summary dictionary (see the module docstring)."""
    sweep = Path(sweep)
    runs = sweep_runs(sweep)
    variants: dict[str, list[SweepRun]] = {}
    for r in runs:
        variants.setdefault(r.variant, []).append(r)
    head = {"sweep": str(sweep), "runs": len(runs)}
    if len(variants) == 1:
        return {**head, **variant_block(runs, split)}
    return {**head, "variants": {v: variant_block(rs, split) for v, rs in variants.items()}}


# --------------------------------------------------------------------------- output
def _fmt(s: dict[str, Any]) -> str:
    if s.get("ci95") is None:
        return f"{s['mean']:.4f} (1 run)"
    return f"{s['mean']:.4f} ± {s['std']:.4f}  [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"


def format_block(block: dict[str, Any], split: str, title: str = "") -> list[str]:
    flag = " (checkpoints chosen on this split: optimistic)" if block["selection"]["chosen_on_this_split"] else ""
    lines = [f"{title}{split}: {block['runs']} runs{flag}", f"  {'metric':<22}mean ± std  [95% CI]"]
    lines += [f"  {k:<22}{_fmt(s)}" for k, s in block["metrics"].items()]
    lines += [f"  {'f1/' + name:<22}{_fmt(c['f1'])}" for name, c in block["per_class"].items()]
    ens = block["ensemble"]
    if "metrics" in ens:
        lines.append(f"  ensemble of {ens['members']}: macro_f1 {ens['metrics']['macro_f1']:.4f}")
    elif "per_fold" in ens:
        lines.append(f"  ensemble of {ens['members']} per fold: macro_f1 " + ", ".join(
            f"fold {f} {e['metrics']['macro_f1']:.4f}" for f, e in ens["per_fold"].items()))
    else:
        lines.append(f"  no ensemble: {ens['note']}")
    if "pooled" in block and "metrics" in block["pooled"]:
        pooled = block["pooled"]
        lines.append(f"  pooled over folds ({pooled['n']} samples): macro_f1 {_fmt(pooled['metrics']['macro_f1'])}")
        if "bootstrap" in pooled:
            b = pooled["bootstrap"]
            lines.append(f"    {b['units']} {b['unit']}s resampled: " + ", ".join(
                f"{k} {v['value']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" for k, v in b["metrics"].items()))
    if block["missing"]:
        lines.append(f"  not evaluated on {split}: {', '.join(block['missing'])}")
    if "warning" in block["selection"]:
        lines.append(f"  WARNING: {block['selection']['warning']}")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    blocks = summary["variants"] if "variants" in summary else {"": summary}
    lines = [f"sweep {summary['sweep']}: {summary['runs']} runs"]
    for variant, v in blocks.items():
        title = f"[{variant}] " if variant else ""
        lines += format_block(v, v["split"], title)
        for s, b in v["other_splits"].items():
            lines += format_block(b, s, title)
    return "\n".join(lines)


def _panel(ax: Any, blocks: dict[str, dict[str, Any]], split: str) -> None:
    """One split: per class, a bar per variant (mean), its 95% interval (clipped to [0, 1]), the runs, the ensemble."""
    import numpy as np

    labels = list(next(iter(blocks.values()))["per_class"])
    width = 0.8 / len(blocks)
    x = np.arange(len(labels))
    for i, (variant, b) in enumerate(blocks.items()):
        pos = x - 0.4 + width * (i + 0.5)
        mean = np.array([b["per_class"][c]["f1"]["mean"] for c in labels])
        ci = np.array([b["per_class"][c]["f1"]["ci95"] or [m, m] for c, m in zip(labels, mean)]).clip(0, 1)
        ax.bar(pos, mean, width, yerr=[mean - ci[:, 0], ci[:, 1] - mean], capsize=3, alpha=0.7, label=variant or None)
        for run in b["per_run"].values():
            ax.plot(pos, [run["f1"][c] for c in labels], ".", color="dimgrey", markersize=4)
        if "per_class" in b["ensemble"]:
            ax.plot(pos, [b["ensemble"]["per_class"][c]["f1"] for c in labels], "D", color="black", markersize=4,
                    label="ensemble" if i == 0 else None)
    chosen = any(b["selection"]["chosen_on_this_split"] for b in blocks.values())
    macro = " | ".join(_fmt(b["metrics"]["macro_f1"]) for b in blocks.values())
    runs = " | ".join(str(b["runs"]) for b in blocks.values())
    ax.set_title(f"{split} ({runs} runs): macro-F1 {macro}"
                 + ("\n* checkpoints chosen on this split: optimistic" if chosen else ""), fontsize=9)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("F1: mean, 95% CI over runs (dots: runs)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)


def plot_summary(summary: dict[str, Any], path: str | Path) -> "Figure":
    """Per-class F1 with 95% intervals, one panel per split (variants side by side within a panel)."""
    from mmer_dist.plots import agg_figure, save_png

    blocks = summary["variants"] if "variants" in summary else {"": summary}
    first = next(iter(blocks.values()))
    splits = [first["split"], *first["other_splits"]]
    k = len(next(iter(blocks.values()))["per_class"])
    fig = agg_figure(max(6.0, 0.7 * k * max(1, len(blocks)) + 2.0) * len(splits), 4.5)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        _panel(ax, {v: (b if b["split"] == split else b["other_splits"][split]) for v, b in blocks.items()
                    if b["split"] == split or split in b["other_splits"]}, split)
    fig.suptitle(f"Sweep {Path(summary['sweep']).name}: {summary['runs']} runs")
    return save_png(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist summarize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep folder written by `mmer-dist sweep` (holds sweep.json)")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="the split summary.json leads with (default: test when every run has it, else dev); "
                        "the other split is kept apart under other_splits")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mmer_dist.experiments.predictions import SampleMismatchError
    from mmer_dist.experiments.sweep import SweepError
    from mmer_dist.shards.schema import write_json_atomic

    sweep = Path(args.sweep)
    try:
        summary = summarize(sweep, args.split)
    except (SweepError, SampleMismatchError, FileNotFoundError, ValueError) as e:
        print(f"mmer-dist summarize: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    write_json_atomic(sweep / "summary.json", summary, indent=2)
    plot_summary(summary, sweep / "summary.png")
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if not args.json:
        print(f"wrote {sweep / 'summary.json'} and {sweep / 'summary.png'}")
    return 0
