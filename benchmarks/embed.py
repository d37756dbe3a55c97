"""Embedding-cache figures: training samples/s on cached embeddings vs on media with the same frozen
encoders (the baseline, measured in the same run), and embedding throughput at 1 and 2 processes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/embed.py                 # synthetic MELD, n=140
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/embed.py --batch-size 8 --steps 40 --skip-minilm

Prints one JSON line per figure, each with the machine and library versions:

    {"figure": "train_samples_per_s", "setup": "debug_tav", "path": "media"|"cached", "samples_per_s", ...}
    {"figure": "train_speedup", "setup": ..., "cached_over_media": x}
    {"figure": "embed_throughput", "processes": 1|2, "samples", "embed_seconds", "samples_per_s", "wall_s"}
    {"figure": "embed_scaling", "two_over_one": x}

Setups: debug_tav = text (random-init debug BERT, mean-pooled) + audio + video (from-scratch debug
encoders, token sequences), all frozen; minilm_text = text only, the packaged all-MiniLM-L6-v2 frozen,
mean-pooled (the MELD recipe's encoder). Training samples/s is the median of the loop's own
`samples_per_s` log records after the first two (warm-up), evaluation excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TAV = ["data.modalities=[text,audio,video]", "data.max_audio_seconds=10.0", "model.text.pooling=mean"]
TAV_FROZEN = ["model.text.freeze=true", "model.audio.freeze=true", "model.video.freeze=true"]
TAV_CACHED = ["model.text.kind=cached", "model.text.pretrained=", "model.text.size=debug",
              "model.audio.kind=cached", "model.audio.pretrained=scratch", "model.audio.size=debug",
              "model.video.kind=cached", "model.video.pretrained=scratch", "model.video.size=debug"]
TEXT = ["data.modalities=[text]", "model.text.pretrained=minilm", "model.text.size=small", "model.text.pooling=mean"]


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", ""), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available()}


def emit(env: dict[str, Any], **fields: Any) -> None:
    print(json.dumps({**fields, "machine": env}), flush=True)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_embed(shards: Path, out: Path, overrides: list[str], processes: int) -> dict[str, Any]:
    """One embed run as a subprocess (plain python or torchrun); its own setup/embedding seconds."""
    launcher = ([sys.executable, "-m", "mmer_dist.embed"] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(_port()), "-m", "mmer_dist.embed"])
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher, "--config", "debug", "--shards", str(shards), "--out", str(out), *overrides],
                          env=_env(), cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"embed failed:\n{proc.stderr[-3000:]}")
    m = re.search(r"\((\d+) samples\).*?([\d.]+) s \(setup ([\d.]+) s, embedding ([\d.]+) s\)", proc.stdout)
    if m is None:
        raise RuntimeError(f"unexpected embed summary:\n{proc.stdout}")
    index = json.loads((out / "index.json").read_text())
    samples = sum(len(si["keys"]) for si in index["splits"].values())
    return {"samples": samples, "setup_s": float(m.group(3)), "embed_s": float(m.group(4)), "wall_s": round(wall, 2)}


def train_rate(shards: Path, run: Path, overrides: list[str], steps: int, batch_size: int) -> dict[str, Any]:
    """Median samples/s of a short training run (log records after the first two)."""
    proc = subprocess.run([sys.executable, "-m", "mmer_dist.train", "--config", "debug", "--shards", str(shards),
                           "--out", str(run), "train.log_every=2", f"train.max_steps={steps}", "train.epochs=1000",
                           f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "optim.warmup_steps=1",
                           f"data.batch_size={batch_size}",
                           *overrides], env=_env(), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train failed:\n{proc.stderr[-3000:]}")
    rates = [r["samples_per_s"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    return {"samples_per_s": round(statistics.median(rates[2:] or rates), 2), "records": len(rates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=140, help="synthetic MELD utterances")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per training measurement")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (per-step overhead weighs less"
                                                                 " on the cached path as it grows)")
    p.add_argument("--skip-minilm", action="store_true", help="skip the MiniLM text setup")
    p.add_argument("--workdir", default="", help="keep the shards and runs here (default: a temp folder)")
    args = p.parse_args()
    env = machine()
    from mmer_dist.corpora.synthetic import write_corpus
    from mmer_dist.shards.pack import pack

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        media = root / "media"
        if not (media / "index.json").exists():
            write_corpus("meld", root / "raw", n=args.n, seed=0)
            pack("meld", root / "raw", media, shard_samples=16, video_size=32, video_fps=4.0, progress=False)

        # embedding throughput, 1 and 2 processes (same output bytes; see tests/smoke/test_embed_dist.py)
        by_procs = {}
        for nproc in (1, 2):
            shutil.rmtree(root / f"emb_tav_{nproc}", ignore_errors=True)     # a fresh run, not a resume
            r = run_embed(media, root / f"emb_tav_{nproc}", TAV, nproc)
            by_procs[nproc] = r
            emit(env, figure="embed_throughput", setup="debug_tav", processes=nproc, samples=r["samples"],
                 embed_seconds=r["embed_s"], setup_seconds=r["setup_s"], wall_s=r["wall_s"],
                 samples_per_s=round(r["samples"] / r["embed_s"], 2),
                 note="embed_seconds = rank 0's embedding loop; with 2 processes each embeds half the shards")
        emit(env, figure="embed_scaling", setup="debug_tav",
             two_over_one=round(by_procs[1]["embed_s"] / by_procs[2]["embed_s"], 3),
             wall_two_over_one=round(by_procs[1]["wall_s"] / by_procs[2]["wall_s"], 3))

        setups = [("debug_tav", TAV, TAV_FROZEN, TAV_CACHED)]
        if not args.skip_minilm:
            setups.append(("minilm_text", TEXT, ["model.text.freeze=true"],
                           ["model.text.kind=cached"]))
        for name, base, frozen, cached in setups:
            emb = root / f"emb_{name}"
            if not (emb / "index.json").exists():
                run_embed(media, emb, [*base, *cached], 1)
            rates = {}
            for path, shards, extra in (("media", media, frozen), ("cached", emb, cached)):
                r = train_rate(shards, root / f"run_{name}_{path}_{args.batch_size}", [*base, *extra], args.steps,
                               args.batch_size)
                rates[path] = r["samples_per_s"]
                emit(env, figure="train_samples_per_s", setup=name, path=path, samples_per_s=r["samples_per_s"],
                     steps=args.steps, batch_size=args.batch_size, log_records=r["records"])
            emit(env, figure="train_speedup", setup=name, baseline="media, same frozen encoders",
                 cached_over_media=round(rates["cached"] / rates["media"], 2))


if __name__ == "__main__":
    main()
