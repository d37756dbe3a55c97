"""`mmer-dist sweep`: a grid of seeds x folds x overrides as ordinary run folders under one sweep folder.

    mmer-dist sweep --config debug --shards S --out SWEEP --seeds 0,1,2
    mmer-dist sweep --config ravdess_audio --shards S --out SWEEP --folds all data.folds=5 data.dev_speakers=2
    mmer-dist sweep ... --launcher "torchrun --standalone --nproc_per_node 2"   # each training on 2 processes
    mmer-dist sweep ... optim.lr=1e-3 optim.lr=3e-4                  # a key given twice is a grid axis
    mmer-dist sweep ... --slurm                                      # a job array, one task per unfinished run

Each run is one folder, SWEEP/[AXIS=VALUE_][foldF_]seedS, made by exactly
    LAUNCHER -m mmer_dist.train --config NAME --shards DIR --out RUN train.seed=S [data.fold=F] [overrides]
    python -m mmer_dist.evaluate --model RUN --shards DIR --split test --out RUN/eval-test
(the test split of a fold run is its held-out fold; shards without a test split and no folds get no
test evaluation). LAUNCHER defaults to this Python (one process). SWEEP/sweep.json records the grid
and every command; running the sweep again with other arguments is refused, with the same ones it
continues: a finished run (metrics.json + export, and its test evaluation) is skipped, an interrupted
one continues with `resume=latest` when it holds checkpoints, a trained but unevaluated one is only
evaluated. Runs go one after another; the first failure stops the sweep (re-run to retry it).
Signals: SIGTERM to the sweep is forwarded to the running training (which checkpoints and exits),
then the sweep stops; Ctrl-C reaches every process of the terminal's group by itself.

With --slurm the sweep writes sweep.json and submits `slurm/sweep.sbatch --out SWEEP` as an array
over the unfinished runs (logs: SWEEP/slurm-JOB_TASK.out); each task runs `mmer-dist sweep --task
--out SWEEP`, which picks run number $SLURM_ARRAY_TASK_ID from sweep.json. The cluster's own flags
(partition, GPUs, CPUs, time) go in --sbatch "..." (or SBATCH_* variables); the script's header holds
defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SWEEP_JSON = "sweep.json"
EVAL_DIR = "eval-{split}"
REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "sweep.sbatch"
_RESERVED = {"train.seed": "--seeds", "data.fold": "--folds", "resume": "(the sweep resumes by itself)",
             "train.resume": "(the sweep resumes by itself)", "data.shards": "--shards"}


_SRUN_LAYOUT = {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NPROCS"}


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message says what to change."""


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: its folder name, seed, fold and the overrides of its variant."""

    name: str
    seed: int
    fold: int | None
    variant: dict[str, str]
    overrides: list[str]                  # fixed + variant + train.seed [+ data.fold]


@dataclass(frozen=True)
class Plan:
    identity: dict[str, Any]              # what makes two invocations the same sweep
    out: Path
    runs: list[RunSpec] = field(default_factory=list)
    test_split: str | None = "test"       # None: the shards have no test split (and no folds)

    def run_dir(self, run: RunSpec) -> Path:
        return self.out / run.name

    def eval_dir(self, run: RunSpec) -> Path | None:
        return self.run_dir(run) / EVAL_DIR.format(split=self.test_split) if self.test_split else None

    def launcher(self) -> list[str]:
        custom = self.identity["launcher"]
        return shlex.split(custom) if custom else [sys.executable]

    def train_command(self, run: RunSpec, resume: bool = False) -> list[str]:
        i = self.identity
        return [*self.launcher(), "-m", "mmer_dist.train", "--config", i["config"], "--shards", i["shards"],
                "--out", str(self.run_dir(run)), *run.overrides, *(["resume=latest"] if resume else [])]

    def eval_command(self, run: RunSpec) -> list[str]:
        return [sys.executable, "-m", "mmer_dist.evaluate", "--model", str(self.run_dir(run)),
                "--shards", self.identity["shards"], "--split", str(self.test_split), "--out", str(self.eval_dir(run))]

    def to_json(self) -> dict[str, Any]:
        runs = [{"name": r.name, "seed": r.seed, "fold": r.fold, "variant": r.variant,
                 "train": shlex.join(self.train_command(r)),
                 "eval": shlex.join(self.eval_command(r)) if self.test_split else None} for r in self.runs]
        return {"version": 1, **self.identity, "test_split": self.test_split, "runs": runs}


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"{what}={text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not values or len(set(values)) != len(values):
        raise SweepError(f"{what}={text!r}: give each value once, e.g. 0,1,2")
    return values


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Fixed overrides, and the grid axes: keys given more than once, with their values in order."""
    values: dict[str, list[str]] = {}
    for text in overrides:
        if "=" not in text:
            raise SweepError(f"override {text!r} is not key=value (e.g. optim.lr=3e-4)")
        key, value = text.split("=", 1)
        if key in _RESERVED:
            raise SweepError(f"override {text!r}: the sweep sets {key} itself; use {_RESERVED[key]}")
        values.setdefault(key, []).append(value)
    fixed = [f"{k}={v[0]}" for k, v in values.items() if len(v) == 1]
    return fixed, {k: v for k, v in values.items() if len(v) > 1}


def _variants(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = [{}]
    for key, vals in axes.items():
        out = [{**v, key: x} for v in out for x in vals]
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")


def _fold_count(config: str, fixed: list[str]) -> int:
    from mmer_dist.presets import load_config

    return int(getattr(load_config(config, fixed).data, "folds", 0) or 0)


def resolve_folds(folds: str | None, config: str, fixed: list[str]) -> list[int] | None:
    """None (no folds) | the fold indices: `all` = 0..K-1 with K from data.folds."""
    if not folds:
        return None
    if folds == "all":
        k = _fold_count(config, fixed)
        if k < 2:
            raise SweepError(f"--folds all needs the number of folds: add data.folds=K (K >= 2) to the overrides "
                             f"or the preset {config!r}")
        return list(range(k))
    return parse_ints(folds, "--folds")


def _has_split(shards: str, split: str) -> bool:
    from mmer_dist.shards.schema import load_index

    return split in load_index(shards).splits


def _run_spec(variant: dict[str, str], fold: int | None, seed: int, fixed: list[str]) -> RunSpec:
    """The grid cell's folder name ([AXIS=VALUE_][foldF_]seedS) and overrides."""
    parts = [_slug(f"{k}={v}") for k, v in variant.items()] + ([f"fold{fold}"] if fold is not None else [])
    overrides = [*fixed, *(f"{k}={v}" for k, v in variant.items()), f"train.seed={seed}",
                 *([f"data.fold={fold}"] if fold is not None else [])]
    return RunSpec("_".join([*parts, f"seed{seed}"]), seed, fold, dict(variant), overrides)


def build_plan(identity: dict[str, Any], out: Path) -> Plan:
    """Every run of the grid (variants, then folds, then seeds), each config checked before anything starts."""
    from mmer_dist.presets import load_config

    fixed, axes = split_overrides(list(identity["overrides"]))
    folds = identity["folds"]
    runs = [_run_spec(variant, fold, seed, fixed) for variant in _variants(axes)
            for fold in (folds if folds is not None else [None]) for seed in identity["seeds"]]
    for run in runs:
        load_config(identity["config"], [*run.overrides, f"data.shards={identity['shards']}"])   # fail early
    test = folds is not None or _has_split(identity["shards"], "test")
    return Plan(identity, out, runs, "test" if test else None)


def identity_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if not args.config or not args.shards:
        raise SweepError("--config and --shards are required (only --task reads them from sweep.json)")
    config = str(Path(args.config).resolve()) if Path(args.config).suffix in (".yaml", ".yml") else args.config
    fixed, _ = split_overrides(list(args.overrides))
    return {"config": config, "shards": str(Path(args.shards).resolve()) if "://" not in args.shards else args.shards,
            "seeds": parse_ints(args.seeds, "--seeds"), "folds": resolve_folds(args.folds, config, fixed),
            "overrides": list(args.overrides), "launcher": args.launcher or ""}


def _original_command(identity: dict[str, Any], out: Path) -> str:
    cmd = ["mmer-dist", "sweep", "--config", identity["config"], "--shards", identity["shards"], "--out", str(out),
           "--seeds", ",".join(map(str, identity["seeds"]))]
    if identity["folds"] is not None:
        cmd += ["--folds", ",".join(map(str, identity["folds"]))]
    if identity["launcher"]:
        cmd += ["--launcher", identity["launcher"]]
    return shlex.join([*cmd, *identity["overrides"]])


def read_sweep(out: Path) -> dict[str, Any]:
    path = out / SWEEP_JSON
    if not path.is_file():
        raise SweepError(f"{out} is not a sweep folder (no {SWEEP_JSON}); start one with "
                         f"`mmer-dist sweep --config NAME --shards DIR --out {out}`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is not valid JSON ({e}); delete it and re-run the original "
                         f"`mmer-dist sweep` command to rewrite it") from None


def record(plan: Plan) -> None:
    """Write SWEEP/sweep.json, or refuse when it holds a different sweep."""
    from mmer_dist.shards.schema import write_json_atomic

    path = plan.out / SWEEP_JSON
    if path.exists():
        old = read_sweep(plan.out)
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in plan.identity.items() if old.get(k) != v]
        if diff:
            raise SweepError(f"{path} holds another sweep ({'; '.join(diff)}); continue it with its own arguments "
                             f"(`{_original_command({k: old.get(k) for k in plan.identity}, plan.out)}`) "
                             f"or choose a new --out")
    plan.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan.to_json(), indent=2)


# --------------------------------------------------------------------------- state of a run
def trained(run_dir: Path) -> bool:
    """The training finished: metrics.json and the export (written atomically, last) exist."""
    return (run_dir / "metrics.json").is_file() and (run_dir / "export" / "model.json").is_file()


def evaluated(eval_dir: Path) -> bool:
    """An evaluation finished: metrics.json and predictions.jsonl (written after it) exist."""
    return (eval_dir / "metrics.json").is_file() and (eval_dir / "predictions.jsonl").is_file()


def has_checkpoints(run_dir: Path) -> bool:
    from mmer_dist.train.checkpoint import complete_checkpoints   # imports torch: only when a run is unfinished

    return bool(complete_checkpoints(run_dir))


def processes_using(folder: Path) -> list[int]:
    """Other processes with `folder` as an argument (Linux /proc; [] elsewhere).

    torchrun starts its ranks in sessions of their own, so SIGKILL to a sweep and its process group
    can leave ranks training on; a second training in the same folder would corrupt both."""
    target, me, pids = str(folder).encode(), os.getpid(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:     # exited while we looked
            continue
        if target in args and int(proc.name) != me:
            pids.append(int(proc.name))
    return sorted(pids)


def run_done(plan: Plan, run: RunSpec) -> bool:
    eval_dir = plan.eval_dir(run)
    return trained(plan.run_dir(run)) and (eval_dir is None or evaluated(eval_dir))


# --------------------------------------------------------------------------- running
class _Forwarder:
    """While a child runs, SIGTERM to the sweep goes to it; afterwards the sweep stops (`with` installs it)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stopped = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Forwarder":
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum: int, frame: Any) -> None:
        self.stopped = True
        if signum == signal.SIGTERM and self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, cmd: list[str]) -> int:
        print(f"$ {shlex.join(cmd)}", flush=True)
        self.child = subprocess.Popen(cmd, env=child_env())
        try:
            return self.child.wait()
        finally:
            self.child = None


def child_env() -> dict[str, str]:
    """The environment of a run: this one without the srun task layout. A sweep task is one Slurm task
    whose run is a world of its own (one process, or the ranks its launcher starts); left in place,
    SLURM_PROCID/SLURM_NTASKS make the training join a process group at the head node's port 29500,
    which two array tasks on one node would both claim."""
    return {k: v for k, v in os.environ.items() if k not in _SRUN_LAYOUT}


def run_one(plan: Plan, run: RunSpec, forward: _Forwarder) -> int:
    """Train (fresh, or resume=latest when the folder holds checkpoints) and evaluate one run, as needed."""
    run_dir, eval_dir = plan.run_dir(run), plan.eval_dir(run)
    busy = processes_using(run_dir)
    if busy:
        raise SweepError(f"{run_dir} is in use by processes {busy} (ranks left by a killed sweep, or another "
                         f"sweep running it); wait for them to end or `kill {' '.join(map(str, busy))}`, then run "
                         f"the same command again")
    if not trained(run_dir):
        resume = has_checkpoints(run_dir)
        print(f"sweep: {run.name}: {'resuming from its checkpoints' if resume else 'training'}", flush=True)
        rc = forward.run(plan.train_command(run, resume))
        if rc != 0:
            return rc
        if not trained(run_dir):   # stopped by a signal: checkpointed, exit 0, no metrics
            forward.stopped = True
            return 0
    if eval_dir is not None and not evaluated(eval_dir):
        print(f"sweep: {run.name}: evaluating on {plan.test_split}", flush=True)
        return forward.run(plan.eval_command(run))
    return 0


def run_local(plan: Plan) -> int:
    """Every unfinished run, one after another; stops at the first failure or signal."""
    todo = [r for r in plan.runs if not run_done(plan, r)]
    print(f"sweep {plan.out}: {len(plan.runs)} runs, {len(plan.runs) - len(todo)} finished, "
          f"{len(todo)} to run", flush=True)
    with _Forwarder() as forward:
        for i, run in enumerate(todo, 1):
            print(f"sweep: [{i}/{len(todo)}] {run.name}", flush=True)
            rc = run_one(plan, run, forward)
            if forward.stopped:
                print(f"sweep: interrupted during {run.name}; run the same command again to continue", file=sys.stderr)
                return 130
            if rc != 0:
                print(f"sweep: {run.name} failed (exit {rc}); fix the cause and run the same command again "
                      f"(finished runs are kept)", file=sys.stderr)
                return 1
    print(f"sweep {plan.out}: all {len(plan.runs)} runs finished; `mmer-dist summarize {plan.out}`", flush=True)
    return 0


def submit_slurm(plan: Plan, site: str = "") -> int:
    """One array task per unfinished run; `site`: sbatch flags of this cluster (partition, GPUs, CPUs)."""
    todo = [i for i, r in enumerate(plan.runs) if not run_done(plan, r)]
    if not todo:
        print(f"sweep {plan.out}: all {len(plan.runs)} runs finished; `mmer-dist summarize {plan.out}`")
        return 0
    if not SBATCH.is_file():
        raise SweepError(f"{SBATCH} not found: --slurm submits the repository's slurm/sweep.sbatch; run from a checkout")
    cmd = ["sbatch", "--parsable", f"--array={','.join(map(str, todo))}", f"--output={plan.out}/slurm-%A_%a.out",
           *shlex.split(site), str(SBATCH), "--out", str(plan.out)]
    print(f"$ {shlex.join(cmd)}", flush=True)
    try:
        job = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        raise SweepError("sbatch not found on PATH: --slurm needs a Slurm login node (or run without --slurm)") from None
    except subprocess.CalledProcessError as e:
        raise SweepError(f"sbatch failed (exit {e.returncode}): {e.stderr.strip()}") from None
    print(f"submitted job array {job}: {len(todo)} of {len(plan.runs)} runs; when it is done, "
          f"`mmer-dist summarize {plan.out}` (re-run this command to resubmit unfinished runs)")
    return 0


def run_task(out: Path, task: str) -> int:
    """One run of a recorded sweep: number `task`, or $SLURM_ARRAY_TASK_ID (what slurm/sweep.sbatch runs)."""
    raw = os.environ.get("SLURM_ARRAY_TASK_ID", "") if task == "env" else task
    identity = {k: v for k, v in read_sweep(out).items() if k not in ("version", "runs")}
    plan = build_plan(identity, out)
    if not raw.isdigit() or int(raw) >= len(plan.runs):
        raise SweepError(f"task {raw!r} is not a run of {out / SWEEP_JSON} (0..{len(plan.runs) - 1}); "
                         f"pass --task N or set SLURM_ARRAY_TASK_ID")
    run = plan.runs[int(raw)]
    if run_done(plan, run):
        print(f"sweep: {run.name} already finished")
        return 0
    with _Forwarder() as forward:
        rc = run_one(plan, run, forward)
    return 130 if forward.stopped and rc == 0 else rc


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="preset name or YAML (as for `mmer-dist train`)")
    p.add_argument("--shards", help="shards folder")
    p.add_argument("--out", required=True, help="sweep folder (one run folder per grid cell, sweep.json)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values (default: 0,1,2)")
    p.add_argument("--folds", default="", help="all (0..K-1, K from data.folds) or a comma list of data.fold values; "
                                               "default: no folds (the shards' own splits)")
    p.add_argument("--launcher", default="", help='training launcher, e.g. "torchrun --standalone --nproc_per_node 2" '
                                                  "(--standalone: a free rendezvous port, so runs never collide; "
                                                  "default: one process of this Python)")
    p.add_argument("--slurm", action="store_true", help="submit a job array (slurm/sweep.sbatch) instead of running here")
    p.add_argument("--sbatch", default="", metavar="FLAGS",
                   help='with --slurm: this cluster\'s sbatch flags, e.g. "--partition gpu --gpus-per-node 8 --cpus-per-task 32"')
    p.add_argument("--task", nargs="?", const="env", default=None, metavar="N",
                   help="run only run N of SWEEP/sweep.json (default N: $SLURM_ARRAY_TASK_ID); used by slurm/sweep.sbatch")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run; a key given twice is a grid axis")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mmer_dist.config import ConfigError

    out = Path(args.out).resolve()
    try:
        if args.task is not None:
            return run_task(out, args.task)
        plan = build_plan(identity_from_args(args), out)
        record(plan)
        return submit_slurm(plan, args.sbatch) if args.slurm else run_local(plan)
    except (SweepError, ConfigError, FileNotFoundError, KeyError) as e:
        print(f"mmer-dist sweep: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
