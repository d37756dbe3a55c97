"""Benchmark of the train loaders: decoded samples/s against loose files, a bare decode loop, and by URL.

    .venv/bin/python benchmarks/loader.py                   # 300 synthetic MELD clips (text + audio + video)
    .venv/bin/python benchmarks/loader.py --n 600 --keep /tmp/bench-loader --workers 0 1 2
    .venv/bin/python benchmarks/loader.py --only url        # just the streaming loader: HTTP vs folder

One run, the same utterances (the train split of a synthetic MELD corpus packed with the train
profile), decoded with the same `cfg.data` (debug-like: 4 frames of 32 x 32, 3 s of audio, 32 tokens):

- bare:   a plain loop of `Decoder(members)` over member bytes already in memory, one process:
          the decode cost alone (no I/O, no collate, no loader);
- loose:  the notebook way, one process: per utterance read the raw clip from the corpus folder
          and decode it (`decode_files`: video + its audio track + the transcript) and collate;
- shards: `build_train_loader` (ShardDataset reads by byte offset, DistributedWeightedSampler,
          DataLoader, collate) with 0, 1, 2 workers; epoch 0 includes the worker start-up,
          epoch 1 (persistent workers) is the steady state quoted as `samples_per_s`.

- url:    the streaming loader (`data.loader=stream`) over the same shards read from the folder and from
          a local HTTP server (`python -m http.server` on 127.0.0.1 serving the folder: the data path of
          every URL, mmer_dist.shards.location, with one streamed GET per shard), 0, 1, 2 workers,
          the folder and the URL interleaved epoch by epoch so the load of the shared machine hits both.

One JSON line per figure, with the machine and versions; ratios are against `bare` (goal:
shards >= 0.8 x bare) and `loose` (goal: shards faster), and for `url` against the folder read by the
same loader in the same run. The machine is shared: each figure is the best of `--repeat` runs.
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
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    import av
    import torch
    import torchaudio

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "torchaudio": torchaudio.__version__, "av": av.__version__,
            "loadavg": os.getloadavg()[0]}


def emit(figure: str, **fields: Any) -> None:
    print(json.dumps({"bench": "loader", "figure": figure, **fields}), flush=True)


def best_of(repeat: int, fn: Any) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def epoch_rate(loader: Any, epoch: int) -> tuple[int, float]:
    """(samples, samples/s) of one epoch of a rank loader."""
    loader.set_epoch(epoch)
    t = time.perf_counter()
    got = sum(len(b["keys"]) for b in loader)
    return got, got / (time.perf_counter() - t)


class LocalHttp:
    """`python -m http.server` on 127.0.0.1 serving `folder`, stopped by its pid."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                      str(folder), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.wait()


def bench_url(shards: Path, cfg: Any, tok: Any, workers: list[int], repeat: int) -> None:
    """The streaming loader over the folder and over HTTP, interleaved epoch by epoch (see the docstring)."""
    from mmer_dist.config import SamplerConfig, replace
    from mmer_dist.data.build import build_train_loader

    with LocalHttp(shards.parent) as base:
        url = f"{base}/{shards.name}"
        for w in workers:
            c = replace(cfg, loader="stream", num_workers=w, cache_dir=str(shards.parent / "cache"))
            loaders = {where: build_train_loader(spec, c, SamplerConfig(), tok, rank=0, world_size=1)
                       for where, spec in (("folder", str(shards)), ("http", url))}
            rates: dict[str, list[float]] = {"folder": [], "http": []}
            for epoch in range(1 + repeat):          # epoch 0 includes the worker start-up: not quoted
                for where, loader in loaders.items():
                    rates[where].append(epoch_rate(loader, epoch)[1])
            best = {where: max(r[1:]) for where, r in rates.items()}
            emit("stream_url", workers=w, folder_samples_per_s=round(best["folder"], 1),
                 http_samples_per_s=round(best["http"], 1),
                 ratio_http_vs_folder=round(best["http"] / best["folder"], 3),
                 samples=len(loaders["http"]) * cfg.batch_size, batch_size=cfg.batch_size, url=url,
                 loadavg=os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="utterances in the synthetic corpus (train split ~70%%)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", type=str, default="", help="work folder to keep (default: a temp folder)")
    ap.add_argument("--only", choices=["all", "url"], default="all", help="url: only the HTTP-vs-folder figures")
    args = ap.parse_args(argv)

    import torch

    from mmer_dist.config import DataConfig, SamplerConfig, replace
    from mmer_dist.corpora.synthetic import write_meld
    from mmer_dist.data.collate import Collator
    from mmer_dist.predict import decode_files
    from mmer_dist.data.build import build_decoder, build_train_loader
    from mmer_dist.data.map_loader import ShardDataset
    from mmer_dist.models.encoders import build_tokenizer
    from mmer_dist.config import EncoderConfig
    from mmer_dist.shards.pack import pack

    torch.set_num_threads(1)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-loader-"))
    raw, shards = work / "raw", work / "shards"
    if not (shards / "index.json").exists():
        t = time.perf_counter()
        write_meld(raw, n=args.n, seed=0)
        pack("meld", raw, shards, workers=2, progress=False)
        emit("setup", seconds=round(time.perf_counter() - t, 2), n=args.n, work=str(work))
    cfg = DataConfig(shards=str(shards), batch_size=args.batch_size, num_workers=0, max_audio_seconds=3.0,
                     video_frames=4, video_size=32, max_text_tokens=32)
    tok = build_tokenizer(EncoderConfig(kind="hf", pretrained="minilm"))
    info = machine()
    if args.only == "url":
        emit("machine", **info)
        bench_url(shards, cfg, tok, args.workers, args.repeat)
        return 0

    # the utterances: member bytes (for the bare loop) and raw sources (for the loose-file loop)
    ds = ShardDataset(shards, "train", cfg, build_decoder(cfg, tok, train=True))
    n = len(ds)
    members = [ds.members(i) for i in range(n)]
    loose = []
    for m in members:
        meta = json.loads(m["json"])
        loose.append((raw / meta["source"]["video"], m.get("txt", b"").decode()))
    mb = sum(len(v) for m in members for k, v in m.items() if k != "__key__") / 1e6
    emit("data", samples=n, shard_mb=round(mb, 2), raw_mb=round(sum(p.stat().st_size for p, _ in loose) / 1e6, 2))

    decoder = build_decoder(cfg, tok, train=True)
    collate = Collator.for_tokenizer(cfg, tok)

    def bare() -> int:
        for i, m in enumerate(members):
            decoder(m, index=i)
        return n

    def loose_files() -> int:
        batch = []
        for path, text in loose:
            batch.append(decode_files(video=path, text=text, cfg_data=cfg, tokenizer=tok))
            if len(batch) == cfg.batch_size:
                collate(batch)
                batch = []
        return n

    t_bare, _ = best_of(args.repeat, bare)
    rate_bare = n / t_bare
    emit("bare_decode", samples_per_s=round(rate_bare, 1), samples=n, seconds=round(t_bare, 3), **info)
    t_loose, _ = best_of(args.repeat, loose_files)
    rate_loose = n / t_loose
    emit("loose_files", samples_per_s=round(rate_loose, 1), samples=n, seconds=round(t_loose, 3),
         ratio_vs_bare=round(rate_loose / rate_bare, 3))

    for w in args.workers:
        loader = build_train_loader(shards, replace(cfg, num_workers=w), SamplerConfig(), tok, rank=0, world_size=1)
        per_epoch = len(loader) * cfg.batch_size
        runs = [epoch_rate(loader, epoch) for epoch in range(1 + args.repeat)]
        rates = [rate for _, rate in runs]
        assert runs[-1][0] == per_epoch, (runs[-1][0], per_epoch)
        steady = max(rates[1:])
        emit("shards_loader", workers=w, samples_per_s=round(steady, 1), first_epoch_samples_per_s=round(rates[0], 1),
             samples=per_epoch, batch_size=cfg.batch_size, ratio_vs_bare=round(steady / rate_bare, 3),
             ratio_vs_loose=round(steady / rate_loose, 3))
        del loader
    bench_url(shards, cfg, tok, args.workers, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
