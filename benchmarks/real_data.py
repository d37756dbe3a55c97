"""Real-data figures: MELD text-only (three imbalance treatments) and RAVDESS speech (held-out actors).

Runs every command of benchmarks/README.md in order, one training at a time, and prints one JSON
line per figure (metrics, wall time, CPU time of the command's processes, load average before and
after, machine and versions). Outputs go under --out (never into the repository); a step whose
output already exists is not run again, so an interrupted run continues where it stopped.

    .venv/bin/python benchmarks/real_data.py --out /tmp/mmer-real                  # everything (~2 h on 2 cores)
    .venv/bin/python benchmarks/real_data.py --out /tmp/mmer-real --only meld-ce,meld-sqrt
    .venv/bin/python benchmarks/real_data.py --out /tmp/mmer-real --list           # the steps and commands

Steps: pack-meld, meld-ce, meld-sqrt, meld-cb (+ optional meld-focal, meld-inverse, meld-*-3ep), meld-compare, the
seeds (meld-*-seed1/2), their ensembles and meld-seeds-compare (paired bootstrap), pack-ravdess, ravdess-audio,
pack-ravdess-all, ravdess-folds (a 5-fold sweep) and its summary, pack-originals, synth-ravdess, synth-train,
predict-originals (`--list` prints them all). Training uses `torchrun
--nproc_per_node 2` with one thread per process (measured ~4.5x faster than one process with two
threads on the shared 2-core machine). The real data is read from ../shared/data (--data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PY = sys.executable


@dataclass
class Step:
    name: str
    argv: list[str]
    done_when: str
    """Path (relative to --out) whose existence means the step already ran."""
    metrics: str = ""
    """metrics.json (relative to --out) to report after the step."""
    env: dict[str, str] = field(default_factory=dict)
    shell_note: str = ""
    json_output: bool = False
    """The command prints one JSON object (from its first line that starts with "{"): reported as "output"."""


def mmer(*args: str) -> list[str]:
    return [PY, "-m", "mmer_dist.cli", *args]


def torchrun(nproc: int, port: int, *args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            "-m", "mmer_dist.train", *args]


def steps(out: Path, data: Path, nproc: int) -> list[Step]:
    o = str(out)
    meld, rav, orig = f"{o}/shards/meld-text", f"{o}/shards/ravdess", f"{o}/shards/ravdess-original-a05"
    one = {"OMP_NUM_THREADS": "1"}
    s: list[Step] = [Step("pack-meld", mmer("pack", "meld", "--root", str(data / "meld"), "--out", meld),
                          "shards/meld-text/index.json")]
    # the preset ships the sqrt-inverse sampler: the baseline is `sampler.weighting=none`
    meld_runs = {"meld-ce": ["sampler.weighting=none"], "meld-sqrt": ["sampler.weighting=sqrt_inverse"],
                 "meld-cb": ["loss.name=class_balanced"], "meld-focal": ["loss.name=focal"],
                 "meld-inverse": ["sampler.weighting=inverse"], "meld-la": ["loss.name=logit_adjusted"],
                 # variants that did not help (benchmarks/README.md)
                 "meld-ce-3ep": ["sampler.weighting=none", "train.epochs=3"], "meld-sqrt-3ep": ["sampler.weighting=sqrt_inverse", "train.epochs=3"],
                 "meld-sqrt-elr1e4": ["sampler.weighting=sqrt_inverse", "optim.encoder_lr=1e-4"],
                 "meld-sqrt-mean": ["sampler.weighting=sqrt_inverse", "model.text.pooling=mean"],
                 "meld-sqrt-focal": ["sampler.weighting=sqrt_inverse", "loss.name=focal"],
                 "meld-sqrt-b16": ["sampler.weighting=sqrt_inverse", "data.batch_size=8", "train.eval_every=312",
                                   "optim.warmup_steps=120"],
                 "meld-sqrt-ctx1": ["sampler.weighting=sqrt_inverse", "data.text_context=1", "data.max_text_tokens=64",
                                    "model.fusion.max_tokens_per_modality=64"]}
    # label smoothing, the weight average, and the seed spread they all sit in
    sqrt, ls, ema = ["sampler.weighting=sqrt_inverse"], ["loss.label_smoothing=0.1"], ["train.ema_decay=0.995"]
    seeds = {"": [], "-seed1": ["train.seed=1", "sampler.seed=1"], "-seed2": ["train.seed=2", "sampler.seed=2"]}
    for suffix, seed in seeds.items():
        if suffix:
            meld_runs[f"meld-sqrt{suffix}"] = sqrt + seed
        meld_runs[f"meld-sqrt-ema{suffix}"] = sqrt + ema + seed
    meld_runs.update({"meld-sqrt-ls": sqrt + ls, "meld-sqrt-ls-ema": sqrt + ls + ema,
                      "meld-sqrt-ls-ema-seed1": sqrt + ls + ema + seeds["-seed1"]})
    # the baseline over the same three seeds: the paired comparison with meld-sqrt{,-seed1,-seed2}
    meld_runs.update({f"meld-ce{suffix}": ["sampler.weighting=none", *seed] for suffix, seed in seeds.items() if suffix})
    ports = iter(range(29630, 29700))

    def train_and_eval(name: str, config: str, shards: str, extra: list[str], split: str) -> list[Step]:
        """A training run (2 processes x 1 thread) and `mmer-dist eval` of its export on `split`."""
        run, ev = f"{o}/runs/{name}", f"runs/{name}/eval-{split}"
        return [Step(name, torchrun(nproc, next(ports), "--config", config, "--shards", shards, "--out", run, *extra),
                     f"runs/{name}/metrics.json", env=one),
                Step(f"{name}-eval", mmer("eval", "--model", run, "--shards", shards, "--split", split,
                                          "--out", f"{o}/{ev}"), f"{ev}/metrics.json", metrics=f"{ev}/metrics.json")]

    for name, extra in meld_runs.items():
        s += train_and_eval(name, "meld_text_minilm", meld, extra, "dev")
    s.append(Step("meld-compare", mmer("compare", *(f"{o}/runs/{n}/eval-dev" for n in ("meld-ce", "meld-sqrt", "meld-cb")),
                                       "--out", f"{o}/runs/meld-compare"), "runs/meld-compare/compare.json"))
    # the ensembles of the three seeds, beside the single runs
    for base in ("meld-ce", "meld-sqrt"):
        members = [f"{o}/runs/{base}{suffix}" for suffix in seeds]
        s.append(Step(f"{base}-ensemble", mmer("eval", "--model", *members, "--shards", meld, "--split", "dev",
                                               "--out", f"{o}/runs/{base}-ensemble"),
                      f"runs/{base}-ensemble/metrics.json", metrics=f"runs/{base}-ensemble/metrics.json"))
    s.append(Step("pack-ravdess", mmer("pack", "ravdess", "--root", str(data / "ravdess"), "--out", rav),
                  "shards/ravdess/index.json"))
    # A second actor split, to check the preset's train.select=last on actors that played no part in choosing it.
    rav_b = f"{o}/shards/ravdess-split-b"
    s.append(Step("pack-ravdess-split-b", mmer("pack", "ravdess", "--root", str(data / "ravdess"), "--out", rav_b,
                                               "--test-actors", "1,2,3,4", "--dev-actors", "5,6"),
                  "shards/ravdess-split-b/index.json"))
    seed1, best = seeds["-seed1"], ["train.select=best"]
    ravdess_runs = {"ravdess-audio": (rav, []), "ravdess-audio-seed1": (rav, seed1),
                    # the same trainings, exporting the best dev epoch instead of the final weights
                    "ravdess-audio-best": (rav, best), "ravdess-audio-seed1-best": (rav, seed1 + best),
                    "ravdess-audio-split-b": (rav_b, []), "ravdess-audio-split-b-best": (rav_b, best)}
    for name, (shards, extra) in ravdess_runs.items():
        s += train_and_eval(name, "ravdess_audio", shards, extra, "test")
    # Speaker-independent folds chosen at training time: every actor packed into "all", 5 folds of 4 actors,
    # dev = the 2 actors before the test fold; each clip is tested once, by the fold holding its actor out.
    # One `mmer-dist sweep` (seed 0 x folds 0-4), then its summary: mean, std, 95% CI and the pooled figure.
    rav_all, folds = f"{o}/shards/ravdess-all", f"{o}/runs/ravdess-folds"
    s.append(Step("pack-ravdess-all", mmer("pack", "ravdess", "--root", str(data / "ravdess"), "--out", rav_all,
                                           "--split", "none"), "shards/ravdess-all/index.json"))
    launcher = shlex.join([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)])
    s.append(Step("ravdess-folds", mmer("sweep", "--config", "ravdess_audio", "--shards", rav_all, "--out", folds,
                                        "--seeds", "0", "--folds", "all", "--launcher", launcher,
                                        "data.folds=5", "data.dev_speakers=2"),
                  "runs/ravdess-folds/fold4_seed0/eval-test/metrics.json", env=one))
    s.append(Step("ravdess-folds-summary", mmer("summarize", folds, "--split", "test", "--json"), "",
                  json_output=True))
    # MELD: the weighted sampler's gain over the baseline, 3 seeds a side, dialogues resampled
    sides = [",".join(f"{o}/runs/{base}{suffix}" for suffix in seeds) for base in ("meld-sqrt", "meld-ce")]
    s.append(Step("meld-seeds-compare", mmer("compare", *sides, "--split", "dev", "--json"), "", json_output=True))
    # The originals: one actor, so it is its own test split; the train profile transcodes 48 kHz (one
    # stereo) wavs to mono 16 kHz FLAC and the 720p mp4s to the training video profile.
    s.append(Step("pack-originals", mmer("pack", "ravdess", "--root", str(data / "ravdess-original"), "--out", orig,
                                         "--test-actors", "5"),
                  "shards/ravdess-original-a05/index.json"))
    synth, synth_shards, synth_run = f"{o}/synth-ravdess", f"{o}/shards/synth-ravdess", f"{o}/runs/synth-ravdess-av"
    s.append(Step("synth-ravdess", mmer("synth", "ravdess", "--out", synth, "--n", "720"), "synth-ravdess"))
    s.append(Step("synth-pack", mmer("pack", "ravdess", "--root", synth, "--out", synth_shards),
                  "shards/synth-ravdess/index.json"))
    s.append(Step("synth-train", torchrun(nproc, next(ports), "--config", "demo", "--shards", synth_shards, "--out", synth_run,
                                          "data.modalities=[text,audio,video]", "train.epochs=30"),
                  "runs/synth-ravdess-av/metrics.json", metrics="runs/synth-ravdess-av/metrics.json", env=one))
    av = sorted((data / "ravdess-original" / "Actor_05").glob("01-*.mp4"))
    wav = sorted((data / "ravdess-original" / "Actor_05").glob("03-*.wav"))
    if av and wav:
        s.append(Step("originals-decode", [PY, str(REPO / "benchmarks" / "real_data.py"), "--decode-check", orig], ""))
        s.append(Step("predict-video", mmer("predict", "--model", synth_run, "--video", str(av[0]), "--json"), ""))
        s.append(Step("predict-video-audio", mmer("predict", "--model", synth_run, "--video", str(av[0]),
                                                  "--audio", str(wav[0]), "--json"), ""))
    return s


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def run_step(step: Step, out: Path, env_info: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(step.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record: dict[str, Any] = {"step": step.name, "rc": proc.returncode, "wall_s": round(wall, 1),
                              "cpu_s": round(cpu, 1), "load_before": round(load0, 2),
                              "load_after": round(os.getloadavg()[0], 2),
                              "command": " ".join(f"{k}={v}" for k, v in step.env.items()) + (" " if step.env else "")
                              + shlex.join(step.argv), "log": str(log)}
    if (step.name.startswith("predict") or step.name == "originals-decode") and proc.returncode == 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
        record["output"] = json.loads(lines[-1]) if lines else None
    if step.json_output and proc.returncode == 0:
        text = log.read_text()
        start = text.find("\n{") + 1 if not text.startswith("{") else 0
        record["output"] = json.loads(text[start:])
    if step.metrics and (out / step.metrics).exists():
        m = json.loads((out / step.metrics).read_text())
        record["metrics"] = {k: m[k] for k in ("macro_f1", "weighted_f1", "accuracy", "uar") if k in m}
        record["per_class_f1"] = {k: round(v["f1"], 4) for k, v in m.get("per_class", {}).items()}
        record["split"] = m.get("split")
    record["machine"] = env_info
    return record


def decode_check(shards: str) -> dict[str, Any]:
    """Decode every sample of every split of `shards` through the training input pipeline (eval
    loader, all three modalities) and summarise what came out: proof the packed formats decode."""
    import torch

    from mmer_dist.config import DataConfig, EncoderConfig
    from mmer_dist.data.build import build_eval_loader
    from mmer_dist.models.encoders import build_tokenizer
    from mmer_dist.shards.schema import load_index

    cfg = DataConfig(shards=shards, modalities=("text", "audio", "video"), eval_batch_size=8, max_audio_seconds=8.0,
                     video_frames=8, video_size=112)
    tok = build_tokenizer(EncoderConfig(kind="hf", pretrained="minilm", size="small"))
    out: dict[str, Any] = {}
    for split in load_index(shards).splits:
        n, present, secs, frames, skipped = 0, {"text": 0, "audio": 0, "video": 0}, [], [], {}
        for batch in build_eval_loader(shards, cfg, tok, split=split, rank=0, world_size=1):
            keep = ~batch["pad"]
            n += int(keep.sum())
            for k, v in batch["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
            for m in present:
                present[m] += int(batch[f"{m}_mask"][keep].any(1).sum())
            secs += (batch["audio_mask"][keep].sum(1).float() / cfg.sample_rate).tolist()
            frames += batch["video_mask"][keep].sum(1)[batch["video_mask"][keep].any(1)].tolist()
            assert torch.isfinite(batch["audio"]).all() and torch.isfinite(batch["video"]).all()
        out[split] = {"samples": n, "present": present, "skipped": skipped,
                      "audio_seconds": [round(min(secs), 2), round(max(secs), 2)] if secs else [],
                      "video_frames": sorted(set(int(f) for f in frames)),
                      "video_tensor": [cfg.video_frames, 3, cfg.video_size, cfg.video_size]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/mmer-real", help="outputs: shards, runs, logs (never the repository)")
    p.add_argument("--data", default=str(DATA), help="the real data folder (meld/, ravdess/, ravdess-original/)")
    p.add_argument("--only", default="", help="comma list of step names (default: all)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    p.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    p.add_argument("--decode-check", default="", metavar="SHARDS",
                   help="decode every sample of SHARDS (all modalities) and print a summary; run nothing else")
    args = p.parse_args(argv)
    if args.decode_check:
        print(json.dumps({"decode_check": args.decode_check, "splits": decode_check(args.decode_check)}))
        return 0
    out, data = Path(args.out), Path(args.data)
    if not (data / "meld").is_dir() or not (data / "ravdess").is_dir():
        print(json.dumps({"skipped": f"no real data at {data} (need meld/ and ravdess/)"}))
        return 0
    plan = steps(out, data, args.nproc)
    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - {s.name for s in plan}
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; known: {', '.join(s.name for s in plan)}")
    env_info = machine()
    for step in plan:
        if only and step.name not in only:
            continue
        if args.list:
            print(f"{step.name}: {' '.join(f'{k}={v}' for k, v in step.env.items())} {shlex.join(step.argv)}")
            continue
        if step.done_when and (out / step.done_when).exists():
            print(json.dumps({"step": step.name, "already_done": str(out / step.done_when)}), flush=True)
            continue
        record = run_step(step, out, env_info)
        print(json.dumps(record), flush=True)
        if record["rc"] != 0:
            print(json.dumps({"stopped": step.name, "see": record["log"]}), flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
