"""Reports a person would rather look at than read: plots, printed tables, run comparison.

Plots are drawn on a plain `matplotlib.figure.Figure` with the Agg canvas, so nothing here
touches pyplot's global state or the user's backend, and importing this module imports no
matplotlib at all. Each plot function saves a PNG and returns the Figure (tests count its axes).

    plot_confusion(metrics, "eval/confusion.png")          # counts | row-normalised
    plot_per_class_f1(metrics, "eval/per_class_f1.png")     # bars + macro-F1 line
    plot_curves("runs/debug", "eval/curves.png")            # from runs/debug/log.jsonl (lr/<component> lines)
    print(print_table(metrics))
    write_eval_report(metrics, "eval", run_dir="runs/debug")  # all of the above

`mmer-dist compare RUN_A RUN_B ... [--out DIR]` prints the runs side by side (each column's
split and sample count, headline metrics, then per-class F1, with deltas against the first run)
and, with --out, writes compare.json and compare.png. Columns of different splits, label sets or
samples (sample counts; the keys of predictions.jsonl where present) are refused unless
`allow_mixed` (`--allow-mixed`). Two runs also get a paired bootstrap: mmer_dist/experiments/compare.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mmer_dist.plots import agg_figure, save_png
from mmer_dist.train.metrics import HEADLINE

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class MetricsNotFoundError(FileNotFoundError):
    """A run/eval folder without metrics.json (or a metrics.json path that does not exist)."""


class MixedComparisonError(ValueError):
    """Columns of a comparison that evaluate different splits or different samples."""


def _check_metrics(metrics: Mapping[str, Any], need: Sequence[str], where: str) -> None:
    missing = [k for k in need if k not in metrics]
    if missing:
        raise ValueError(f"{where}: metrics lack {missing}; expected the dictionary written by "
                         f"`mmer-dist eval` (mmer_dist.train.metrics.compute_metrics)")


def _labels(metrics: Mapping[str, Any]) -> list[str]:
    return list(metrics.get("labels") or metrics["per_class"].keys())


# --------------------------------------------------------------------------- plots
def plot_confusion(metrics: Mapping[str, Any], path: str | Path) -> "Figure":
    """Two panels: the confusion matrix in counts and row-normalised (recall on the diagonal)."""
    import numpy as np

    _check_metrics(metrics, ["confusion_matrix"], "plot_confusion")
    labels = _labels(metrics)
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    if cm.shape != (len(labels), len(labels)):
        raise ValueError(f"plot_confusion: confusion_matrix has shape {cm.shape} for {len(labels)} labels")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)  # a class without samples: zeros

    k = len(labels)
    side = max(4.0, 0.6 * k + 2.0)
    fig = agg_figure(2 * side + 0.5, side)
    axes = fig.subplots(1, 2)
    panels = [(cm, "counts", lambda v: f"{int(v)}"), (norm, "row-normalised (recall)", lambda v: f"{v:.2f}")]
    for ax, (mat, title, fmt) in zip(axes, panels):
        vmax = mat.max() if mat.max() > 0 else 1.0
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_xticks(range(k), labels, rotation=45, ha="right")
        ax.set_yticks(range(k), [f"{name} ({int(rows[i, 0])})" for i, name in enumerate(labels)])
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt(mat[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if mat[i, j] > 0.6 * vmax else "black")
    n = int(cm.sum())
    head = f"n={n}"
    if "macro_f1" in metrics:
        head += f"   macro-F1 {metrics['macro_f1']:.3f}"
    if "accuracy" in metrics:
        head += f"   accuracy {metrics['accuracy']:.3f}"
    fig.suptitle(f"Confusion matrix ({head})")
    return save_png(fig, path)


def plot_per_class_f1(metrics: Mapping[str, Any], path: str | Path) -> "Figure":
    """One bar per class (support in the tick label) and a horizontal macro-F1 line."""
    _check_metrics(metrics, ["per_class"], "plot_per_class_f1")
    labels = _labels(metrics)
    pc = metrics["per_class"]
    f1 = [float(pc[name]["f1"]) for name in labels]
    fig = agg_figure(max(5.0, 0.9 * len(labels) + 2.0), 4.0)
    ax = fig.subplots()
    bars = ax.bar(range(len(labels)), f1, color="tab:blue")
    for bar, v in zip(bars, f1):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), [f"{name}\n(n={int(pc[name]['support'])})" for name in labels])
    if "macro_f1" in metrics:
        ax.axhline(float(metrics["macro_f1"]), color="tab:red", linestyle="--",
                   label=f"macro-F1 {float(metrics['macro_f1']):.3f}")
        ax.legend(loc="upper right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("F1")
    ax.set_xlabel("class (support)")
    ax.set_title("Per-class F1")
    return save_png(fig, path)


def read_log(log_path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a log.jsonl and the line numbers that were not JSON objects (counted, not fatal)."""
    log_path = Path(log_path)
    if not log_path.is_file():
        raise FileNotFoundError(f"no training log at {log_path}: plot_curves reads RUN_DIR/log.jsonl, "
                                f"written by `mmer-dist train`; pass the run folder")
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    with log_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if not isinstance(obj, dict) or "step" not in obj:
                bad.append(lineno)
                continue
            rows.append(obj)
    return rows, bad


def _series(rows: Sequence[Mapping[str, Any]], split_ok: Any, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for one metric, sorted by step; a step logged twice (a resumed run) keeps the last."""
    by_step: dict[float, float] = {}
    for r in rows:
        if split_ok(r.get("split", "train")) and isinstance(r.get(key), (int, float)):
            by_step[float(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _lr_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The learning-rate fields of the train rows: `lr/<component>` (one per parameter group's component:
    fusion, text, audio, video), or the single `lr` of logs written before they were split."""
    keys = sorted({k for r in rows if r.get("split", "train") == "train" for k in r if k.startswith("lr/")})
    return keys or ["lr"]


def plot_curves(run_dir: str | Path, path: str | Path) -> "Figure":
    """Three panels from RUN_DIR/log.jsonl: train loss, the learning rate of each component (fusion/head and
    every trainable encoder), eval macro/weighted F1 vs step."""
    log_path = Path(run_dir) / "log.jsonl"
    rows, bad = read_log(log_path)
    if bad:
        warnings.warn(f"{log_path}: {len(bad)} lines are not JSON objects with a 'step' and were skipped "
                      f"(lines {bad[:10]}{'...' if len(bad) > 10 else ''})", stacklevel=2)
    is_train = lambda s: s == "train"  # noqa: E731
    eval_splits = sorted({str(r.get("split")) for r in rows if r.get("split", "train") not in ("train", "epoch")})

    fig = agg_figure(13.0, 3.8)
    ax_loss, ax_lr, ax_f1 = fig.subplots(1, 3)

    def empty(ax: Any, what: str) -> None:
        ax.text(0.5, 0.5, f"no {what} in\n{log_path.name}", ha="center", va="center", transform=ax.transAxes)

    s, v = _series(rows, is_train, "loss")
    if s:
        ax_loss.plot(s, v, color="tab:blue", label="train")
    for split in eval_splits:
        es, ev = _series(rows, lambda x, sp=split: x == sp, "loss")
        if es:
            ax_loss.plot(es, ev, "o-", color="tab:orange", label=split)
    if s:
        ax_loss.legend()
    else:
        empty(ax_loss, "train loss")
    ax_loss.set_title("loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")

    drawn_lr = False
    for key in _lr_keys(rows):
        s, v = _series(rows, is_train, key)
        if s:
            ax_lr.plot(s, v, label=key.removeprefix("lr/") if key != "lr" else "lr (first group)")
            drawn_lr = True
    if drawn_lr:
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.legend()
    else:
        empty(ax_lr, "learning rate")
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("lr")

    drawn = False
    for split in eval_splits:
        for key, style in (("macro_f1", "o-"), ("weighted_f1", "s--")):
            es, ev = _series(rows, lambda x, sp=split: x == sp, key)
            if es:
                ax_f1.plot(es, ev, style, label=f"{split} {key.replace('_', '-')}")
                drawn = True
    if drawn:
        ax_f1.set_ylim(0, 1.0)
        ax_f1.legend()
    else:
        empty(ax_f1, "eval metrics")
    ax_f1.set_title("eval F1")
    ax_f1.set_xlabel("step")
    ax_f1.set_ylabel("F1")
    fig.suptitle(f"Training curves: {Path(run_dir).resolve().name}")
    return save_png(fig, path)


# --------------------------------------------------------------------------- tables
def print_table(metrics: Mapping[str, Any]) -> str:
    """A readable table: per class precision/recall/F1/support, then the headline rows."""
    _check_metrics(metrics, ["per_class"], "print_table")
    labels = _labels(metrics)
    pc = metrics["per_class"]
    w = max([len("weighted_f1")] + [len(x) for x in labels]) + 2
    lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
             "-" * (w + 40)]
    for name in labels:
        c = pc[name]
        lines.append(f"{name:<{w}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{int(c['support']):>10d}")
    lines.append("-" * (w + 40))
    n = metrics.get("n", sum(int(pc[x]["support"]) for x in labels))
    for key in HEADLINE:
        if key in metrics:
            lines.append(f"{key:<{w}}{'':>20}{float(metrics[key]):>10.4f}{int(n):>10d}")
    if "loss" in metrics:
        lines.append(f"{'loss':<{w}}{'':>20}{float(metrics['loss']):>10.4f}")
    return "\n".join(lines)


def write_eval_report(metrics: Mapping[str, Any], out_dir: str | Path,
                      run_dir: str | Path | None = None) -> dict[str, Path]:
    """confusion.png, per_class_f1.png and (when RUN_DIR/log.jsonl exists) curves.png in OUT."""
    out = Path(out_dir)
    paths = {"confusion": out / "confusion.png", "per_class_f1": out / "per_class_f1.png"}
    plot_confusion(metrics, paths["confusion"])
    plot_per_class_f1(metrics, paths["per_class_f1"])
    if run_dir is not None and (Path(run_dir) / "log.jsonl").is_file():
        paths["curves"] = out / "curves.png"
        plot_curves(run_dir, paths["curves"])
    return paths


# --------------------------------------------------------------------------- compare
def resolve_metrics_path(arg: str | Path) -> Path:
    """RUN/metrics.json, EVAL/metrics.json, or the metrics.json path itself."""
    p = Path(arg)
    if p.is_dir():
        cand = p / "metrics.json"
        if cand.is_file():
            return cand
        raise MetricsNotFoundError(
            f"no metrics.json in {p} (looked for {cand}); run `mmer-dist eval --model {p} --shards SHARDS "
            f"--split test --out {p}` first (or finish `mmer-dist train`, which writes RUN/metrics.json)")
    if p.is_file():
        return p
    raise MetricsNotFoundError(
        f"{p} does not exist; pass a run folder, an eval folder or a metrics.json written by "
        f"`mmer-dist eval ...` (run `mmer-dist eval --model RUN --shards SHARDS --split test --out DIR` first)")


def load_metrics(arg: str | Path) -> dict[str, Any]:
    """The metrics dictionary of a run/eval folder or metrics.json, with an error naming the file."""
    path = resolve_metrics_path(arg)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `mmer-dist eval ...` to rewrite it") from None
    if not isinstance(metrics, dict) or "per_class" not in metrics:
        raise ValueError(f"{path} has no per_class entry: not a metrics.json written by `mmer-dist eval`")
    return metrics


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Folder names of the runs (for a metrics.json: its folder); made unique with parent folders."""
    dirs = [p.parent.resolve() for p in paths]
    depth = 1
    while True:
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names) or depth > max(len(d.parts) for d in dirs):
            break
        depth += 1
    seen: dict[str, int] = {}
    out = []
    for n in names:  # the same run given twice: suffix #2, #3
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def _sample_count(m: Mapping[str, Any]) -> int:
    return int(m.get("n", sum(int(c["support"]) for c in m["per_class"].values())))


def _prediction_keys(metrics_path: Path) -> set[str] | None:
    """The keys of predictions.jsonl beside a metrics.json (None when there is none)."""
    path = metrics_path.parent / "predictions.jsonl"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return {json.loads(line)["key"] for line in f if line.strip()}


def check_comparable(names: Sequence[str], paths: Sequence[Path], metrics: Sequence[Mapping[str, Any]]) -> None:
    """Refuse columns of different splits, label sets, sample counts or sample keys (with the fix)."""
    fix = "compare evaluations of the same split of the same shards, or pass --allow-mixed to show them anyway"

    def refuse(what: str, values: Sequence[Any]) -> None:
        shown = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        raise MixedComparisonError(f"the columns {what} ({shown}); {fix}")

    splits = [m.get("split") for m in metrics]
    if len({s for s in splits if s is not None}) > 1:
        refuse("evaluate different splits", splits)
    if len({tuple(_labels(m)) for m in metrics}) > 1:
        refuse("predict different label sets", [_labels(m) for m in metrics])
    counts = [_sample_count(m) for m in metrics]
    if len(set(counts)) > 1:
        refuse("hold different numbers of samples", counts)
    keyed = [(n, p, k) for n, p in zip(names, paths) if (k := _prediction_keys(p)) is not None]
    for n, p, k in keyed[1:]:
        n0, p0, k0 = keyed[0]
        if k != k0:
            example = sorted(k0 ^ k)[0]
            raise MixedComparisonError(f"{n0} and {n} hold different samples: {len(k0 - k)} keys only in "
                                       f"{p0.parent / 'predictions.jsonl'}, {len(k - k0)} only in "
                                       f"{p.parent / 'predictions.jsonl'} (e.g. {example}); {fix}")


def compare_runs(args_runs: Sequence[str | Path], allow_mixed: bool = False) -> dict[str, Any]:
    """Rows (headline metrics, then `f1/<label>` per class) x runs, and deltas against the first run.

    Each run carries its split and sample count; different splits or sample sets are a
    MixedComparisonError unless `allow_mixed`."""
    paths = [resolve_metrics_path(r) for r in args_runs]
    metrics = [load_metrics(p) for p in paths]
    names = _run_names(paths)
    if not allow_mixed:
        check_comparable(names, paths, metrics)
    labels: list[str] = []
    for m in metrics:  # union of label sets, in order of first appearance
        labels += [x for x in _labels(m) if x not in labels]
    rows: dict[str, dict[str, float | None]] = {}
    for key in HEADLINE:
        rows[key] = {n: (float(m[key]) if key in m else None) for n, m in zip(names, metrics)}
    for label in labels:
        rows[f"f1/{label}"] = {n: (float(m["per_class"][label]["f1"]) if label in m["per_class"] else None)
                               for n, m in zip(names, metrics)}
    support = {label: {n: (int(m["per_class"][label]["support"]) if label in m["per_class"] else None)
                       for n, m in zip(names, metrics)} for label in labels}
    base = names[0]
    deltas: dict[str, dict[str, float | None]] = {}
    for n in names[1:]:
        deltas[n] = {row: (vals[n] - vals[base] if vals[n] is not None and vals[base] is not None else None)
                     for row, vals in rows.items()}
    return {"runs": [{"name": n, "metrics": str(p), "split": m.get("split"), "n": _sample_count(m)}
                     for n, p, m in zip(names, paths, metrics)],
            "baseline": base, "labels": labels, "rows": rows, "deltas": deltas, "support": support}


def format_compare(cmp: Mapping[str, Any]) -> str:
    """The side-by-side table: one column per run, one Δ column per run after the first."""
    names = [r["name"] for r in cmp["runs"]]
    base = cmp["baseline"]
    dnames = [f"Δ {n}" for n in names[1:]]
    rw = max([len(r) for r in cmp["rows"]] + [6]) + 2
    cw = max([len(n) for n in names + dnames] + [8]) + 2

    def cell(v: float | None, delta: bool = False) -> str:
        if v is None:
            return f"{'-':>{cw}}"
        return f"{v:>+{cw}.4f}" if delta else f"{v:>{cw}.4f}"

    lines = [f"{'metric':<{rw}}" + "".join(f"{n:>{cw}}" for n in names) + "".join(f"{d:>{cw}}" for d in dnames)]
    for what in ("split", "n"):   # what each column was evaluated on
        lines.append(f"{what:<{rw}}" + "".join(f"{str(r.get(what) if r.get(what) is not None else '?'):>{cw}}"
                                              for r in cmp["runs"]))
    lines.append("-" * len(lines[0]))
    for i, (row, vals) in enumerate(cmp["rows"].items()):
        if i == len(HEADLINE):
            lines.append("-" * len(lines[0]))
        lines.append(f"{row:<{rw}}" + "".join(cell(vals[n]) for n in names)
                     + "".join(cell(cmp["deltas"][n][row], delta=True) for n in names[1:]))
    if dnames:
        lines.append(f"(Δ = run - {base})")
    for r in cmp["runs"]:
        lines.append(f"{r['name']}: {r['metrics']}")
    return "\n".join(lines)


def plot_compare(cmp: Mapping[str, Any], path: str | Path) -> "Figure":
    """Grouped bars: per-class F1 of every run, then the macro-F1 group."""
    import numpy as np

    names = [r["name"] for r in cmp["runs"]]
    groups = [f"f1/{x}" for x in cmp["labels"]] + ["macro_f1"]
    ticks = list(cmp["labels"]) + ["macro-F1"]
    width = 0.8 / len(names)
    fig = agg_figure(max(6.0, 0.5 * len(groups) * max(2, len(names)) + 2.0), 4.5)
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, n in enumerate(names):
        vals = [cmp["rows"][g][n] for g in groups]
        ax.bar(x - 0.4 + width * (i + 0.5), [v if v is not None else 0.0 for v in vals], width, label=n)
    ax.axvline(len(groups) - 1.5, color="grey", linewidth=0.8)
    ax.set_xticks(x, ticks, rotation=30, ha="right")
    ax.set_ylim(0, 1.15)  # headroom so the legend row never covers a bar at 1.0
    ax.set_ylabel("F1")
    ax.set_title("Per-class F1 by run")
    ax.legend(loc="upper center", ncol=len(names), fontsize=8)
    return save_png(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist compare",
                                description="Compare the metrics.json of several runs or evaluations: a table of the "
                                   "headline metrics and per-class F1, optionally compare.png and compare.json.")
    p.add_argument("runs", nargs="+", help="run folders, eval folders or metrics.json files")
    p.add_argument("--out", default="", help="folder for compare.png and compare.json (default: none)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="show columns of different splits or sample sets side by side anyway")
    return p


def main(argv: list[str] | None = None) -> int:
    """`mmer-dist compare RUN_OR_METRICS ... [--out DIR]`: print the table; with --out write compare.json/png."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cmp = compare_runs(list(args.runs), allow_mixed=args.allow_mixed)
    except (MetricsNotFoundError, ValueError) as e:
        print(f"mmer-dist compare: error: {e}", file=sys.stderr)
        return 2
    print(format_compare(cmp))
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(cmp, indent=2) + "\n", encoding="utf-8")
        plot_compare(cmp, out_dir / "compare.png")
        print(f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.png'}")
    return 0
