"""Training throughput on CPU: the full mmer_dist loop on shards vs a bare PyTorch loop, 1 vs 2 processes.

    nice -n 5 .venv/bin/python benchmarks/train.py                     # debug + demo, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/train.py --configs debug --steps 20 --samples 200 --keep /tmp/bench-train

One run, one synthetic MELD corpus (text + audio + video, packed with the train profile like the
demo: 64 px, 10 fps), and for each model config (`debug`, `demo`):

- bare:  the train split decoded ONCE into memory with the same `Decoder` / `Collator` as the
         loader, then a plain loop: `build_model(cfg.model)`, `torch.optim.AdamW`, forward, loss,
         backward, clip, step over the cached batches. No Accelerate, no loader, no logging. With 2
         processes it is torch DDP over gloo (torchrun), each rank on its half of the cached batches.
- full:  `python -m mmer_dist.train --config NAME` on the shards (loader, sampler, Accelerate, progress
         bar, log.jsonl, TensorBoard) with eval and checkpoints pushed past the end of the run and
         `data.num_workers=--num-workers` (default 1: decoding runs in a DataLoader worker, as in any
         real run); the rate is the one the loop itself logs (`samples_per_s` in RUN/log.jsonl) over
         the timed steps, start-up and the first `--warmup` steps excluded.

Two measures per figure. `samples_per_s` (wall clock) is what the issue asks for, but on a shared,
oversubscribed machine it mostly measures the scheduler's share. `samples_per_cpu_s` (samples per
CPU-second of the training processes: process_time in the bare ranks; /proc utime+stime of the ranks
and torchrun's agent between the first and the last timed log record for the full loop) does not
depend on the load; the DataLoader workers' CPU is reported apart, as `loader_worker_cpu_ms_per_sample`
(the decode cost, paid by worker cores on a GPU node).

Each is measured as 1 process with OMP_NUM_THREADS=1, 1 process with OMP_NUM_THREADS=2, and 2 processes
(torchrun --nproc_per_node 2, OMP_NUM_THREADS=1 each). Samples/s are global (all ranks). Bare and
full run back to back, `--repeat` times, and each figure is the best of its repeats (all are printed):
the machine is shared and one descheduled core halves a rate. The ratio full/bare is per (processes,
threads); the goal is >= 0.9. `scaling` lines give the 2-process rate over the 1-process rates.

A `decode` figure measures what ONE loader worker delivers (one process, one thread, member bytes in
memory: the `Decoder` alone) for a MELD-like train-profile sample at GPU-model input sizes (16 frames
of 224 px from a 224 px / 8 fps clip, 8 s of audio, 64 tokens), to size the workers an 8-GPU node needs.

One JSON line per figure, each with the machine (cores, CPU model, load average at that moment) and
versions. The machine is shared: quote the load average with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    return {"cores": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def emit(env: dict[str, Any], figure: str, **fields: Any) -> None:
    print(json.dumps({"bench": "train", "figure": figure, **fields, "loadavg_1m": round(os.getloadavg()[0], 2),
                      "machine": env}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MMER_DEEPSPEED_CONFIG", None)
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    return env


def tree_cpu_seconds(root: int, rank_depth: int) -> dict[str, float]:
    """User + system CPU seconds of `root`'s live process tree, split into the training processes
    (depth <= rank_depth: the ranks, and torchrun's agent) and the deeper ones (DataLoader workers)."""
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()      # after "pid (comm) "
        parent[int(d)], ticks[int(d)] = int(fields[1]), int(fields[11]) + int(fields[12])
    depth, frontier = {root: 0}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parent.items():
            if pp == p and c not in depth:
                depth[c] = depth[p] + 1
                frontier.append(c)
    hz = os.sysconf("SC_CLK_TCK")
    return {"trainer": sum(ticks.get(p, 0) for p, d in depth.items() if d <= rank_depth) / hz,
            "workers": sum(ticks.get(p, 0) for p, d in depth.items() if d > rank_depth) / hz}


class LogWatch:
    """Snapshots the run's process-tree CPU time when RUN/log.jsonl reaches given train-record counts."""

    def __init__(self, log: Path, marks: list[int], rank_depth: int) -> None:
        self.log, self.marks, self.rank_depth = log, marks, rank_depth
        self.cpu: dict[int, dict[str, float]] = {}
        self.size = -1

    def poll(self, pid: int) -> None:
        try:
            size = self.log.stat().st_size
        except OSError:
            return
        if size == self.size:
            return
        self.size = size
        n = sum(1 for x in self.log.read_text().splitlines() if '"split": "train"' in x)
        for m in self.marks:
            if n >= m and m not in self.cpu:
                self.cpu[m] = tree_cpu_seconds(pid, self.rank_depth)


def launch(module_args: list[str], nproc: int, threads: int, log: Path,
           watch: LogWatch | None = None) -> tuple[int, float]:
    """Run `python -m ...` (nproc=1) or `torchrun --nproc_per_node nproc -m ...`; returns (rc, wall s)."""
    py = sys.executable
    if nproc == 1:
        cmd = [py, *module_args]
    else:
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *module_args]
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=child_env(threads), stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
        while proc.poll() is None:
            if watch is not None:
                watch.poll(proc.pid)
            time.sleep(0.02)
    return proc.returncode, time.perf_counter() - t


# --------------------------------------------------------------------------- bare loop (child process)


def bare_worker(cache: Path, config: str, shards: str, steps: int, warmup: int, out: Path) -> int:
    """The bare loop on cached batches; with WORLD_SIZE > 1, torch DDP over gloo (no Accelerate)."""
    import torch
    import torch.distributed as tdist

    from mmer_dist.config import replace
    from mmer_dist.presets import load_config
    from mmer_dist.models import build_model
    from mmer_dist.models.heads import build_loss

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        tdist.init_process_group("gloo")
    blob = torch.load(cache, weights_only=False)
    cfg = load_config(config, [f"data.shards={shards}"])
    model_cfg = replace(cfg.model, num_classes=blob["num_classes"], modalities=tuple(cfg.data.modalities),
                        sample_rate=cfg.data.sample_rate)
    batches = blob["batches"][rank::world]
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    loss_fn = build_loss(cfg.loss, blob["class_counts"])
    model.train()

    def step(batch: dict[str, Any]) -> float:
        loss = loss_fn(model(batch).float(), batch["labels"])
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for k in range(warmup):
        step(batches[k % len(batches)])
    if world > 1:
        tdist.barrier()
    t, c = time.perf_counter(), time.process_time()
    samples = 0
    for k in range(warmup, warmup + steps):
        batch = batches[k % len(batches)]
        step(batch)
        samples += len(batch["labels"])
    cpu = torch.tensor([time.process_time() - c], dtype=torch.float64)
    if world > 1:
        tdist.barrier()
        tdist.all_reduce(cpu)             # CPU seconds of all ranks
    dt = time.perf_counter() - t
    if rank == 0:
        out.write_text(json.dumps({"samples": samples * world, "seconds": dt, "samples_per_s": samples * world / dt,
                                   "cpu_seconds": cpu.item(), "samples_per_cpu_s": samples * world / cpu.item()}))
    if world > 1:
        tdist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- setup and figures


def make_shards(work: Path, n: int, env: dict[str, Any]) -> Path:
    from mmer_dist.corpora.synthetic import write_corpus
    from mmer_dist.shards.pack import pack

    shards = work / "shards"
    if not (shards / "index.json").exists():
        t = time.perf_counter()
        write_corpus("meld", work / "raw", n=n, seed=0)
        pack("meld", work / "raw", shards, profile="train", workers=2, shard_samples=100, video_size=64,
             video_fps=10.0, progress=False)
        emit(env, "setup", seconds=round(time.perf_counter() - t, 2), utterances=n, shards=str(shards))
    return shards


def cache_batches(config: str, shards: Path, path: Path) -> dict[str, Any]:
    """Decode the train split once with the loader's Decoder/Collator; save the batches for the bare loop."""
    import torch

    from mmer_dist.presets import load_config
    from mmer_dist.data.collate import Collator
    from mmer_dist.data.build import build_decoder
    from mmer_dist.data.map_loader import ShardDataset
    from mmer_dist.models.encoders import build_tokenizer

    cfg = load_config(config, [f"data.shards={shards}"])
    tok = build_tokenizer(cfg.model.text) if "text" in cfg.data.modalities else None
    ds = ShardDataset(shards, cfg.data.train_split, cfg.data, build_decoder(cfg.data, tok, train=True,
                                                                            seed=cfg.train.seed))
    collate = Collator.for_tokenizer(cfg.data, tok)
    b = cfg.data.batch_size
    batches = []
    for start in range(0, len(ds) - b + 1, b):
        batch = collate([ds[(i, False, 0, i)] for i in range(start, start + b)])
        batches.append({k: v for k, v in batch.items() if k not in ("skipped", "degraded")})
    torch.save({"batches": batches, "num_classes": len(ds.label_names), "class_counts": ds.class_counts}, path)
    return {"batches": len(batches), "batch_size": b, "train_samples": len(ds), "preset_num_workers": cfg.data.num_workers}


def full_rate(run: Path, interval_samples: int) -> dict[str, Any]:
    """samples/s over RUN/log.jsonl's train records after the first (which includes start-up).

    Each record's `samples_per_s` is the samples since the previous record over the seconds since it,
    so the timed window is the sum of interval_samples / rate over the kept records.
    """
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("split") == "train"]
    timed = train[1:]
    if not timed:
        raise RuntimeError(f"{run}/log.jsonl: {len(train)} train records, none after the warm-up; raise --steps")
    seconds = sum(interval_samples / r["samples_per_s"] for r in timed)
    return {"samples_per_s": len(timed) * interval_samples / seconds, "seconds": seconds,
            "steps": timed[-1]["step"] - train[0]["step"], "per_interval": [round(r["samples_per_s"], 1) for r in timed]}


def run_bare(config: str, cache: Path, shards: Path, work: Path, nproc: int, threads: int, k: int,
             args: argparse.Namespace) -> dict[str, Any]:
    tag = f"bare-{config}-{nproc}x{threads}-{k}"
    out = work / f"{tag}.json"
    rc, wall = launch([str(Path(__file__).resolve()), "--bare-worker", str(cache), "--config-name", config,
                       "--shards", str(shards), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--out", str(out)], nproc, threads, work / f"{tag}.log")
    if rc != 0:
        raise RuntimeError(f"bare loop failed (rc {rc}); see {work / tag}.log")
    return {**json.loads(out.read_text()), "wall": wall, "load": os.getloadavg()[0]}


def run_full(config: str, shards: Path, work: Path, nproc: int, threads: int, k: int, batch_size: int,
             args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    tag = f"run-{config}-{nproc}x{threads}-{k}"
    run = work / tag
    if run.exists():
        shutil.rmtree(run)
    total = args.warmup + args.steps
    # eval and checkpoints only after the last timed step: the rate is the training steps alone
    # CPU time of the whole process tree between the first train record (after the warm-up) and the last
    last = total // args.warmup
    watch = LogWatch(run / "log.jsonl", [1, last], rank_depth=0 if nproc == 1 else 1)
    rc, wall = launch(["-m", "mmer_dist.train", "--config", config, "--shards", str(shards), "--out", str(run),
                       f"data.num_workers={args.num_workers}", f"train.max_steps={total}", f"train.log_every={args.warmup}",
                       f"train.eval_every={10 * total}", f"train.checkpoint_every={10 * total}"],
                      nproc, threads, work / f"{tag}.log", watch)
    if rc != 0:
        raise RuntimeError(f"full loop failed (rc {rc}); see {work / tag}.log")
    r = full_rate(run, args.warmup * batch_size * nproc)
    samples = args.steps * batch_size * nproc
    trainer = watch.cpu[last]["trainer"] - watch.cpu[1]["trainer"]
    workers = watch.cpu[last]["workers"] - watch.cpu[1]["workers"]
    # the ranks' CPU per sample is what compares with the bare loop; the workers' is the decode cost
    return {**r, "cpu_seconds": trainer, "samples_per_cpu_s": samples / trainer,
            "worker_cpu_ms_per_sample": 1000 * workers / samples, "wall": wall, "load": os.getloadavg()[0]}


def measure(config: str, shards: Path, work: Path, args: argparse.Namespace, env: dict[str, Any]) -> None:
    cache = work / f"cache-{config}.pt"
    t = time.perf_counter()
    info = cache_batches(config, shards, cache)
    emit(env, "cache", config=config, decode_seconds=round(time.perf_counter() - t, 2), **info)
    b = info["batch_size"]
    layouts = [(1, 1), (1, 2), (2, 1)]          # (processes, OMP threads per process)
    best: dict[str, dict[tuple[int, int], float]] = {"bare": {}, "full": {}}
    for nproc, threads in layouts:
        bares, fulls = [], []
        # bare and full back to back, repeated: both see the same (shared-machine) load; best of the repeats
        for k in range(args.repeat):
            bares.append(run_bare(config, cache, shards, work, nproc, threads, k, args))
            fulls.append(run_full(config, shards, work, nproc, threads, k, b, args))
        rb = max(bares, key=lambda r: r["samples_per_s"])
        rf = max(fulls, key=lambda r: r["samples_per_s"])
        cb = max(r["samples_per_cpu_s"] for r in bares)
        cf = max(r["samples_per_cpu_s"] for r in fulls)
        best["bare"][(nproc, threads)], best["full"][(nproc, threads)] = rb["samples_per_s"], rf["samples_per_s"]
        common = {"config": config, "world_size": nproc, "omp_threads": threads, "batch_size": b}
        emit(env, "bare", **common, samples_per_s=round(rb["samples_per_s"], 2),
             repeats=[round(r["samples_per_s"], 2) for r in bares], timed_steps=args.steps,
             seconds=round(rb["seconds"], 2), wall_seconds=round(rb["wall"], 1),
             samples_per_cpu_s=round(cb, 2), repeats_per_cpu_s=[round(r["samples_per_cpu_s"], 2) for r in bares],
             loop="plain torch (DDP over gloo when world_size 2), cached batches, AdamW, clip")
        emit(env, "full", **common, num_workers=args.num_workers, samples_per_s=round(rf["samples_per_s"], 2),
             repeats=[round(r["samples_per_s"], 2) for r in fulls], timed_steps=rf["steps"],
             seconds=round(rf["seconds"], 2), wall_seconds=round(rf["wall"], 1),
             startup_and_final_eval_seconds=round(rf["wall"] - rf["seconds"], 1), per_interval=rf["per_interval"],
             bare_samples_per_s=round(rb["samples_per_s"], 2),
             ratio_full_vs_bare=round(rf["samples_per_s"] / rb["samples_per_s"], 3),
             samples_per_cpu_s=round(cf, 2), repeats_per_cpu_s=[round(r["samples_per_cpu_s"], 2) for r in fulls],
             bare_samples_per_cpu_s=round(cb, 2), ratio_full_vs_bare_per_cpu_s=round(cf / cb, 3),
             loader_worker_cpu_ms_per_sample=round(min(r["worker_cpu_ms_per_sample"] for r in fulls), 2))
    for name, rates in best.items():
        emit(env, "scaling", config=config, loop=name, two_proc_samples_per_s=round(rates[(2, 1)], 2),
             one_proc_one_thread=round(rates[(1, 1)], 2), one_proc_two_threads=round(rates[(1, 2)], 2),
             two_proc_vs_one_proc_one_thread=round(rates[(2, 1)] / rates[(1, 1)], 3),
             two_proc_vs_one_proc_two_threads=round(rates[(2, 1)] / rates[(1, 2)], 3),
             two_threads_vs_one=round(rates[(1, 2)] / rates[(1, 1)], 3))


def decode_figure(work: Path, n: int, repeat: int, env: dict[str, Any]) -> None:
    """One loader worker's decode rate for a MELD-like train-profile sample at GPU-model input sizes."""
    import torch

    from mmer_dist.config import DataConfig, EncoderConfig
    from mmer_dist.corpora.synthetic import write_corpus
    from mmer_dist.data.build import build_decoder
    from mmer_dist.data.map_loader import ShardDataset
    from mmer_dist.models.encoders import build_tokenizer
    from mmer_dist.shards.pack import pack

    torch.set_num_threads(1)
    raw, shards = work / "raw224", work / "shards224"
    if not (shards / "index.json").exists():
        t = time.perf_counter()
        # MELD utterances last ~3 s on average; the train profile (224 px, 8 fps, 16 kHz FLAC) is the pack default,
        # so clips are rendered at 8 fps (the source rate changes the pack time, not what the loader decodes)
        write_corpus("meld", raw, n=n, seed=0, seconds=(2.5, 4.0), frame_size=224, fps=8.0)
        pack("meld", raw, shards, profile="train", workers=2, progress=False)
        emit(env, "decode_setup", seconds=round(time.perf_counter() - t, 2), utterances=n)
    cfg = DataConfig(shards=str(shards), video_frames=16, video_size=224, max_audio_seconds=8.0, max_text_tokens=64)
    tok = build_tokenizer(EncoderConfig(kind="hf", pretrained="minilm"))
    dec = build_decoder(cfg, tok, train=True)
    ds = ShardDataset(shards, "train", cfg, dec)
    members = [ds.members(i) for i in range(len(ds))]
    mean_kb = sum(len(v) for m in members for k, v in m.items() if k != "__key__") / len(members) / 1024
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        for i, m in enumerate(members):
            dec(m, index=i)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    # per CPU-second: what one dedicated core delivers, whatever else the shared machine runs meanwhile
    emit(env, "decode_per_worker", samples=len(members), sample_kb=round(mean_kb, 1), video_frames=16, video_size=224,
         clip_fps=8.0, max_audio_seconds=8.0, max_text_tokens=64, threads=1,
         samples_per_s=round(len(members) / best, 1), samples_per_cpu_s=round(len(members) / best_cpu, 1),
         ms_per_sample=round(1000 * best / len(members), 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=300, help="synthetic MELD utterances (train split ~70%%)")
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per figure (multiple of --warmup)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps (also the full loop's log interval)")
    ap.add_argument("--num-workers", type=int, default=1,
                    help="full loop: data.num_workers (default 1: decode off the training process, as on a GPU node; "
                         "0: decode inside it, the trainer CPU then includes decoding)")
    ap.add_argument("--configs", nargs="*", default=["debug", "demo"], help="model configs (none: decode figure only)")
    ap.add_argument("--decode-samples", type=int, default=63,
                    help="224 px clips for the decode-per-worker figure (>= 63, the synthetic MELD minimum; 0: skip)")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per figure (bare and full interleaved)")
    ap.add_argument("--keep", default="", help="work folder to keep and reuse (default: a temp folder)")
    # internal: the bare loop runs in its own process(es) so the thread count is set from the start
    ap.add_argument("--bare-worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--config-name", default="", help=argparse.SUPPRESS)
    ap.add_argument("--shards", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_worker:
        return bare_worker(Path(args.bare_worker), args.config_name, args.shards, args.steps, args.warmup, Path(args.out))
    if args.steps % args.warmup:
        ap.error(f"--steps {args.steps} must be a multiple of --warmup {args.warmup} (the full loop logs every --warmup steps)")

    env = machine()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emit(env, "start", work=str(work), steps=args.steps, warmup=args.warmup, samples=args.samples)
    shards = make_shards(work, args.samples, env)
    for config in args.configs:
        measure(config, shards, work, args, env)
    if args.decode_samples:
        decode_figure(work, args.decode_samples, args.repeat, env)
    emit(env, "done", total_seconds=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
