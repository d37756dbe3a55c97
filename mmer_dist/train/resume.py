"""The resume guard: a run folder trains with one config; a resume may only make it longer or change
how often it evaluates, logs and checkpoints, and every start after the first is recorded.

    plan = plan_resume(cfg, run_dir)       # preflight (every rank, no process group): ConfigError with the diff
    record_start(run_dir, cfg, plan)       # train() on the main rank: config.yaml once, then resumes.jsonl

What a run folder keeps:

    RUN/config.yaml      the resolved config of the run's first start; never rewritten
    RUN/resumes.jsonl    one JSON object per later start (a resume, or a fresh start into a folder whose
                         first start left no checkpoint): {"time", "step", "checkpoint", "changed":
                         {key: [before, now]}, "command"}; config.yaml plus the `changed` entries, in
                         order, give the config every step trained with

The new resolved config is compared key by key (dotted, e.g. `model.fusion.width`) with the config.yaml
of the run that wrote the checkpoint (with no checkpoint: the run folder's). Only `MAY_CHANGE` may
differ; anything else (model shape, data, sampler, loss, optimiser, seed, precision, engine, ...) is
refused before any process starts, with each differing key, both values and the fix: resume with the
run's values, or train into a new --out. A checkpoint holds weights, optimiser state and a data
position that only make sense under the values that produced them.

A longer run (`train.epochs` / `train.max_steps` raised): the loop runs to the new length, but the
learning-rate schedule keeps the total it was built with (its WarmupCosine state is saved with the
LambdaLR in the checkpoint and loaded over the new one), so every step past the old total trains at
the schedule's floor, lr x optim.min_lr_ratio, for every parameter group. The cosine is deliberately
not stretched: that would raise the rate again mid-run. To decay over the longer length, start a new
run. A length at or below the checkpoint's step ends the run at once (final evaluation and export).

`train.resume`: `latest` with no checkpoint says so and starts fresh (what a Slurm requeue needs);
`must` refuses instead; a checkpoint path must exist (mmer_dist.train.checkpoint.resolve_resume).
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmer_dist.config import Config, ConfigError
from mmer_dist.presets import config_from_file, save_config, to_dict
from mmer_dist.train.checkpoint import read_trainer_state, resolve_resume, run_dir_of

CONFIG_FILE = "config.yaml"
RESUMES_FILE = "resumes.jsonl"
MAY_CHANGE = ("name", "train.resume", "train.epochs", "train.max_steps", "train.eval_every", "train.log_every",
              "train.checkpoint_every", "train.keep_checkpoints", "train.dist_timeout_s", "data.loader_timeout_s",
              "data.max_skip_fraction")
"""Keys a resume may change: the record's name, the length, the cadences, checkpoints kept, the timeouts, the
skip budget."""
DERIVED_FROM_WORLD = ("data.batch_size", "train.grad_accum")
"""With data.global_batch_size these follow the number of processes (train.preflight.resolve_for_world): a
resume on another number of processes (elastic) may change them."""
LENGTH_KEYS = ("train.epochs", "train.max_steps")


@dataclass(frozen=True)
class ResumePlan:
    """How this start continues its run folder."""

    checkpoint: Path | None                  # the checkpoint to load; None = train from step 0
    step: int = 0                            # optimizer steps done at that checkpoint
    changed: dict[str, list[Any]] = field(default_factory=dict)   # MAY_CHANGE key -> [recorded, now]
    first: bool = True                       # the run folder has no config.yaml yet: this start writes it
    asked: str = ""                          # train.resume as given


def flatten(cfg: Config) -> dict[str, Any]:
    """Every leaf of a config by its dotted key (`optim.lr`), lists as in config.yaml."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = node

    walk(to_dict(cfg), "")
    return out


def config_diff(before: Config, now: Config) -> dict[str, list[Any]]:
    """{dotted key: [before, now]} for every key whose value differs (data.shards compared as resolved paths)."""
    a, b = flatten(before), flatten(now)
    diff = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    shards = diff.get("data.shards")
    if shards and all(shards) and Path(shards[0]).resolve() == Path(shards[1]).resolve():
        del diff["data.shards"]
    return diff


def plan_resume(cfg: Config, run_dir: Path) -> ResumePlan:
    """Which checkpoint this start loads and which keys it changes; ConfigError for a change it may not make."""
    run_dir = Path(run_dir)
    checkpoint = resolve_resume(run_dir, cfg.train.resume)
    reference = run_dir_of(checkpoint) / CONFIG_FILE if checkpoint is not None else run_dir / CONFIG_FILE
    first = not (run_dir / CONFIG_FILE).is_file()
    if not reference.is_file():
        if checkpoint is not None:
            raise ConfigError(f"{reference} not found: the config of {checkpoint} is unknown, so this config cannot "
                              f"be checked against it; restore that file, or train into a new --out")
        return ResumePlan(None, first=True, asked=cfg.train.resume)
    diff = config_diff(config_from_file(reference), cfg)
    derived = DERIVED_FROM_WORLD if cfg.data.global_batch_size else ()
    refused = {k: v for k, v in diff.items() if k not in MAY_CHANGE and k not in derived}
    if refused:
        raise ConfigError(_refusal(reference, refused, checkpoint))
    step = read_trainer_state(checkpoint).step if checkpoint is not None else 0
    changed = {k: v for k, v in diff.items() if k not in ("train.resume", "name")}
    return ResumePlan(checkpoint, step, changed, first, cfg.train.resume)


def _refusal(reference: Path, refused: dict[str, list[Any]], checkpoint: Path | None) -> str:
    lines = [f"  {k}: {before!r} in {reference.name}, {now!r} now" for k, (before, now) in refused.items()]
    what = (f"the config of the run that wrote {checkpoint}" if checkpoint is not None
            else f"the config of an earlier start of {reference.parent}, which left no checkpoint")
    return (f"{reference} is {what}; this start differs in keys a run cannot change:\n" + "\n".join(lines) + "\n"
            f"Use the run's values (drop these overrides, or pass the run's --config), or train into a new --out. "
            f"A resume may change only {', '.join(MAY_CHANGE)}.")


def record_start(run_dir: Path, cfg: Config, plan: ResumePlan) -> list[str]:
    """Write config.yaml (first start) or append this start to resumes.jsonl; the lines to tell the user."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.first:
        save_config(cfg, run_dir / CONFIG_FILE)
    if plan.checkpoint is not None or not plan.first:
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "step": plan.step, "checkpoint": str(plan.checkpoint) if plan.checkpoint else None,
                 "changed": plan.changed, "command": " ".join(sys.argv)}
        with open(run_dir / RESUMES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    return _notices(run_dir, plan)


def _notices(run_dir: Path, plan: ResumePlan) -> list[str]:
    notes = []
    if plan.checkpoint is None and plan.asked in ("latest", "must"):
        notes.append(f"resume={plan.asked}: no checkpoint in {run_dir / 'checkpoints'} yet; starting a fresh run")
    if plan.changed:
        changes = ", ".join(f"{k} {before} -> {now}" for k, (before, now) in plan.changed.items())
        notes.append(f"this start changes {changes} (recorded in {run_dir / RESUMES_FILE}; "
                     f"{run_dir / CONFIG_FILE} keeps the first start's config)")
    if plan.checkpoint is not None and any(k in plan.changed for k in LENGTH_KEYS):
        notes.append("the learning-rate schedule keeps the length the run started with: steps past it train at "
                     "its floor, optim.lr x optim.min_lr_ratio (see mmer_dist/train/resume.py)")
    return notes
