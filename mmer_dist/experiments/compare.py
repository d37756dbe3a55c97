"""`mmer-dist compare`: runs side by side, and for two runs or sweeps a paired bootstrap of the difference.

    mmer-dist compare RUN_A/eval-test RUN_B/eval-test          # the table, then A - B with its 95% CI and p
    mmer-dist compare RUN_A RUN_B --split test --json           # the paired bootstrap as one JSON object
    mmer-dist compare SWEEP_A SWEEP_B                           # two sweeps (see below)
    mmer-dist compare A_SEED0,A_SEED1,A_SEED2 B_SEED0,B_SEED1,B_SEED2 --split dev   # runs listed by hand
    mmer-dist compare R1 R2 R3 [--out DIR]                      # more than two: the table (compare.json/png)

The table (mmer_dist.report.compare_runs) shows each column's split and sample count and refuses
different splits or sample sets unless --allow-mixed. The paired bootstrap
(mmer_dist.experiments.stats.paired_bootstrap) needs each side's predictions.jsonl and the same
samples on both sides (refused otherwise, naming how many keys differ); it resamples the corpus's
independent units (MELD dialogues, RAVDESS actors, else utterances), seeded (--seed).
With --json it prints {"metric": "macro_f1", "a", "b", "difference", "ci95": [lo, hi], "p_value",
"unit", "units", "n", "split", "runs", "per_class": {label: {...}}, ...}.

Two sweeps: every run of each side on the same resampled units, the statistic being A's mean
Macro-F1 over its runs minus B's (the expected gain of a single run: no seed pairing needed, and the
same as pairing run by run when the seeds match). A fold sweep's runs of one seed are pooled first,
so each side's sets cover every sample once. A side may also be run (or eval) folders joined by
commas: the seeds of one configuration trained outside a sweep, compared the same way. The interval
is over evaluation samples for these trained runs; the spread over seeds is `mmer-dist summarize`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmer_dist.experiments.predictions import Predictions



def is_sweep(path: str | Path) -> bool:
    return (Path(path) / "sweep.json").is_file()


def run_list(arg: str | Path) -> list[Path]:
    """The folders of a side given as `R1,R2,...` (several runs of one configuration); [] for one path."""
    text = str(arg)
    if "," not in text or Path(text).exists():
        return []
    return [Path(p) for p in text.split(",") if p]


def is_several(arg: str | Path) -> bool:
    """A side that holds several runs (a sweep or a comma list): no side-by-side table, only the test."""
    return is_sweep(arg) or bool(run_list(arg))


def _sweep_sets(sweep: Path, split: str | None) -> tuple[list["Predictions"], str]:
    """One prediction set per seed (folds pooled), and the split they are on."""
    from mmer_dist.experiments.predictions import load_predictions, pool
    from mmer_dist.experiments.summary import evaluation_dir, sweep_runs

    runs = sweep_runs(sweep)
    variants = sorted({r.variant for r in runs})
    if len(variants) > 1:
        raise ValueError(f"{sweep} varies overrides ({'; '.join(variants)}): a side must be one configuration; "
                         f"see `mmer-dist summarize {sweep}` for each variant")
    if split is None:
        split = "test" if all(evaluation_dir(r.path, "test") for r in runs) else "dev"
    missing = [r.name for r in runs if evaluation_dir(r.path, split) is None]
    if missing:
        raise FileNotFoundError(f"{sweep}: {len(missing)} runs have no {split} evaluation ({', '.join(missing[:3])}); "
                                f"finish the sweep (`mmer-dist sweep` with its arguments) or choose --split")
    seeds = sorted({r.seed for r in runs})
    return [pool([load_predictions(evaluation_dir(r.path, split)) for r in runs if r.seed == s])   # type: ignore[arg-type]
             for s in seeds], split


def side_sets(arg: str | Path, split: str | None) -> tuple[list["Predictions"], str | None]:
    """The prediction sets of a sweep (one per seed) or of a run/eval folder (one)."""
    from mmer_dist.experiments.predictions import load_predictions
    from mmer_dist.experiments.summary import evaluation_dir

    path = Path(arg)
    if is_sweep(path):
        return _sweep_sets(path, split)
    if run_list(arg):
        sides = [side_sets(p, split) for p in run_list(arg)]
        splits = sorted({str(sp) for _, sp in sides})
        if len(splits) > 1:
            raise ValueError(f"the runs of {arg} are on different splits ({', '.join(splits)}): pass --split")
        return [sets[0] for sets, _ in sides], sides[0][1]
    if split is not None and path.is_dir():
        where = evaluation_dir(path, split)
        if where is None:
            raise FileNotFoundError(f"{path} has no {split} evaluation (no {path / f'eval-{split}'} and its "
                                    f"metrics.json is not of {split}); run `mmer-dist eval --model {path} --shards "
                                    f"SHARDS --split {split} --out {path / f'eval-{split}'}`")
        path = where
    pred = load_predictions(path)
    return [pred], pred.split


def paired_compare(a: str | Path, b: str | Path, split: str | None = None, resamples: int | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """The paired bootstrap of A - B as the --json object."""
    from mmer_dist.experiments.predictions import check_same_samples
    from mmer_dist.experiments.stats import RESAMPLES, paired_bootstrap

    sets_a, split_a = side_sets(a, split)
    sets_b, split_b = side_sets(b, split)
    if split_a != split_b:
        raise ValueError(f"{a} is on split {split_a} but {b} on {split_b}: pass --split to compare one split")
    check_same_samples([*sets_a, *sets_b], [f"{a} [{i}]" if len(sets_a) > 1 else str(a) for i in range(len(sets_a))]
                       + [f"{b} [{i}]" if len(sets_b) > 1 else str(b) for i in range(len(sets_b))])
    first = sets_a[0]
    res = paired_bootstrap(first.y_true, [p.y_pred for p in sets_a], [p.y_pred for p in sets_b], first.groups,
                           first.labels, unit=first.unit, resamples=resamples or RESAMPLES, seed=seed)
    out = res.to_json()
    return {**out, "split": split_a, "runs": {"a": len(sets_a), "b": len(sets_b)}, "sources": {"a": str(a), "b": str(b)}}


def format_paired(r: dict[str, Any]) -> str:
    head = (f"paired bootstrap, A = {r['sources']['a']} ({r['runs']['a']} run(s)), B = {r['sources']['b']} "
            f"({r['runs']['b']} run(s)); split {r['split']}, {r['n']} samples in {r['units']} {r['unit']}s, "
            f"{r['resamples']} resamples of the {r['unit']}s, seed {r['seed']}")

    def line(name: str, x: dict[str, Any]) -> str:
        return (f"  {name:<20}A {x['a']:.4f}  B {x['b']:.4f}  A-B {x['difference']:+.4f}  "
                f"95% CI [{x['ci95'][0]:+.4f}, {x['ci95'][1]:+.4f}]  p = {x['p_value']:.4f}")

    lines = [head, line("macro_f1", r)] + [line(f"f1/{k}", v) for k, v in r["per_class"].items()]
    if r.get("note"):
        lines.append(f"  note: {r['note']}")
    lines.append("  (p: two-sided, the percentile interval inverted; see mmer_dist/experiments/stats.py)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, eval folders, metrics.json files; or two sides, each a "
                                           "sweep folder or run folders joined by commas (R1,R2,R3)")
    p.add_argument("--out", default="", help="folder for compare.json and compare.png of the table (default: none)")
    p.add_argument("--split", choices=["dev", "test"], default=None,
                   help="which evaluation of a run or sweep folder to use (default: a run's own metrics.json; "
                        "a sweep's test when every run has it, else dev)")
    p.add_argument("--json", action="store_true", help="two runs or sweeps: print the paired bootstrap as JSON")
    p.add_argument("--allow-mixed", action="store_true",
                   help="show columns of different splits or sample sets side by side anyway (no paired test)")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    return p


def _table_args(args: argparse.Namespace) -> list[str]:
    if args.split is None:
        return list(args.runs)
    from mmer_dist.experiments.summary import evaluation_dir

    return [str(evaluation_dir(Path(r), args.split) or r) if Path(r).is_dir() else r for r in args.runs]


def _usage_problem(args: argparse.Namespace) -> str:
    several = [r for r in args.runs if is_several(r)]
    if several and len(args.runs) != 2:
        return f"a sweep or a list of runs ({several[0]}) compares with exactly one other run, sweep or list"
    if args.json and len(args.runs) != 2:
        return "--json prints the paired bootstrap of exactly two runs or sweeps"
    return ""


def _paired(args: argparse.Namespace, table_shown: bool) -> int:
    """Print the paired bootstrap of the two arguments; after a table, a missing input is only a note."""
    try:
        result = paired_compare(args.runs[0], args.runs[1], args.split, args.resamples, args.seed)
    except (FileNotFoundError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        if table_shown and (isinstance(e, FileNotFoundError) or args.allow_mixed):
            print(f"\nno paired test: {msg}")   # the table stands on its own
            return 0
        print(f"mmer-dist compare: error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else "\n" + format_paired(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mmer_dist import report

    problem = _usage_problem(args)
    if problem:
        print(f"mmer-dist compare: error: {problem}", file=sys.stderr)
        return 2
    table = not args.json and not any(is_several(r) for r in args.runs)
    if table:
        rc = report.main([*_table_args(args), *(["--out", args.out] if args.out else []),
                          *(["--allow-mixed"] if args.allow_mixed else [])])
        if rc != 0 or len(args.runs) != 2:
            return rc
    return _paired(args, table_shown=table)
