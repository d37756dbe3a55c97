"""Rank start-up, loader-worker memory and evaluation merge at 1M-10M samples: the compact index vs the old one.

    .venv/bin/python benchmarks/index.py                    # defaults: ~3 CPU-minutes (5-10 min wall here)
    .venv/bin/python benchmarks/index.py --old-10m          # + the old code at 10M (~11 GB, ~100 CPU-s per run)
    .venv/bin/python benchmarks/index.py --only startup --sizes 1000000 --ranks 8 --keep

What is compared, in the same run: "old" = the code before the compact index (commit 70296c4,
extracted with `git archive` into the cache folder; `--old-code DIR` to use another checkout) and
"new" = the code this script lives in (`--new-code DIR`). Both are package `mmer_dist`, so every
figure runs in its own subprocess with PYTHONPATH set to one of them (OMP_NUM_THREADS=1,
torch.set_num_threads(1)), rank 0 of a simulated world; all other ranks do the same work.

Synthetic indexes in each format, MELD-like (7 classes, 47% neutral; keys `meld-train-diaD_uttU`,
10 utterances per dialogue, 1,000 speakers; json+txt+flac+mp4 members, 1,000 samples per shard,
one `train` split; no tar bytes: start-up reads only the index):
  old  index.json with every key and label (indent 1, as `mmer-dist pack` wrote it) + one
       `{shard}.stats.json` per shard with every sample's members {ext: [offset, size]}; written with
       plain string templates (shard 0 is checked byte-for-byte against json.dumps(indent=1)).
  new  index.json summaries (schema 2) + `samples/train/*.npy` columns, written by the new code's
       `write_index` (mmer_dist.shards.merge).
They live in `--cache` (default /tmp/mmer-bench-index: 0.33 GB old at 1M, 0.03 / 0.3 GB new at 1M / 10M;
3.3 GB more with --old-10m) and are deleted at the end unless `--keep` (a kept cache is reused; the sparse
tars of the worker figure hold a few MB of real blocks).

Figures, one JSON line each (with the machine, the versions and the 1-minute load average):
  startup   (sizes x ranks x weightings x code) `startup_cpu_s`: CPU seconds (time.process_time) of
            `load_index` + `build_train_loader(..., rank=0, world_size=R)` (the dataset over the index,
            the sampler weights) + the epoch's plan (the first batch of the batch sampler) + the first
            batch's index lookup (old: `ShardDataset.locate`, new: the rows of the compact index; no tar
            read, no decode). `rss_mb_above_torch`: peak RSS (VmHWM, reset after the imports) minus the
            RSS right after `import torch`. Weightings: `none` (the default: a uniform shuffle,
            torch.randperm of the split) and `inverse` (per-sample weights, draws with replacement).
            The old figure is a lower bound of the old training start-up (training read index.json 3-4
            times, issue 16). `first_batch_crc` is equal for old and new: the same draw.
  worker    (code x size, after the first start-up of each: R=8, weighting none) the rank forks `--workers`
            DataLoader workers (fork, as torch does on Linux); each one reads `--reads` samples' raw members
            (`ShardDataset.members`: one pread per member (old) / per sample (new), from sparse tars whose
            headers the rank writes for just those samples), then does the index lookups of its whole share
            of the rank's epoch (old: `locate` + the entry's members; new: the rows of the compact index;
            no tar bytes), then a full gc.collect(), which Python runs sooner or later in a long-lived
            worker. Memory at each stage, per worker, from /proc/self/status and smaps_rollup: `rss_mb`
            (counts every page inherited from the rank, so it says little), `pss_mb`, `private_mb` and
            `private_dirty_mb` (pages only this worker holds, written: copy-on-write copies and its own
            allocations; what a worker adds to the node). The compact index's pages are page cache
            (`pss_file_mb`), shared by every process of the node that maps them.
  eval      (code x eval split size, R=512) one evaluation of N samples over 512 simulated ranks.
            old: each rank's `EvalAccumulator` (its share of rows) -> the payload every rank receives
            from `all_gather_object` (512 pickled payloads, padded to the largest as torch does) ->
            unpickle + `merge_payloads` on the receiving rank: `received_mb`, `merge_peak_mb` (peak RSS
            above the RSS before the receive), `merge_cpu_s`. new: all 512 ranks' accumulators
            (confusion matrix, count, coverage digest, loss sums) fed batch by batch, their sums
            added as the all-reduce would and the coverage checked exactly (`exact`): `received_mb`
            (the all-reduce tensor + the gathered skip reasons), `rank_peak_mb` (rank 0's accumulator,
            peak RSS above the RSS before it starts); flat in N.
  summary   ratios old/new for every (size, ranks, weighting) measured with both codes, and the goal
            (issue 16): new at 10M under 5 CPU-s and under 300 MB above `import torch` per rank, flat
            in the number of ranks.

Defaults: sizes 1M and 10M, ranks 8 64 512, both weightings; the old code runs at 1M only: at 10M it
needs ~11 GB and ~100 CPU-s per rank (measured: 96 CPU-s, 11.2 GB), and writing its index 90 CPU-s, so
`--old-10m` adds it (~12 CPU-minutes more with the defaults; `--ranks 8 --weightings none --workers 0`
for one figure). CPU-seconds and RSS are the figures to quote (the 2 cores here are shared: wall times
are not measured; under heavy load CPU-seconds too vary by up to 2x, so compare figures of one run).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "70296c4"
LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
MIX = (0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03)
EXTS = ("json", "txt", "flac", "mp4")
PER_SHARD = 1000
SPEAKERS = 1000
SEED = 0
BATCH = 16
EVAL_BATCH = 32
GOAL = {"startup_cpu_s": 5.0, "rss_mb_above_torch": 300.0, "samples": 10_000_000}


# --------------------------------------------------------------------------- measuring

def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _rollup_mb() -> dict[str, float]:
    """From /proc/self/smaps_rollup (Linux >= 4.14), MB: pss (this process's share of every page it maps),
    pss_file (of which page cache: the compact index, libraries), private (pages no other process maps) and
    private_dirty (of which written: copy-on-write copies and new allocations, memory only this process holds)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return {}
    kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}

    def mb(*keys: str) -> float:
        return round(sum(kb.get(k, 0) for k in keys) / 1024, 1)

    return {"pss_mb": mb("Pss"), "pss_file_mb": mb("Pss_File"), "private_mb": mb("Private_Clean", "Private_Dirty"),
            "private_dirty_mb": mb("Private_Dirty")}


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed (the peak then includes the imports)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu() -> float:
    return time.process_time()


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its finished subprocesses."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _memory() -> dict[str, float]:
    return {"rss_mb": round(_status_mb("VmRSS"), 1), **_rollup_mb()}


# --------------------------------------------------------------------------- the synthetic corpus

def shard_sizes(n: int) -> list[int]:
    return [PER_SHARD] * (n // PER_SHARD) + ([n % PER_SHARD] if n % PER_SHARD else [])


def shard_name(split: str, s: int) -> str:
    return f"meld-{split}-{s:06d}.tar"


def shard_layout(s: int, size: int) -> dict[str, np.ndarray]:
    """Shard s's samples (global indices s*PER_SHARD + j), deterministic: labels, durations, members in tar order."""
    rng = np.random.default_rng([SEED, s])
    label = rng.choice(len(MIX), size=size, p=MIX).astype(np.int16)
    duration = np.round(rng.uniform(1.0, 8.0, size), 3)
    sizes = np.empty((size, len(EXTS)), dtype=np.int64)
    sizes[:, 0] = rng.integers(450, 900, size)                                   # KEY.json
    sizes[:, 1] = rng.integers(10, 300, size)                                    # KEY.txt
    sizes[:, 2] = (duration * 32000).astype(np.int64) + rng.integers(0, 4096, size)   # KEY.flac
    sizes[:, 3] = (duration * 48000).astype(np.int64) + rng.integers(0, 8192, size)   # KEY.mp4
    blocks = 512 + (sizes + 511) // 512 * 512                                    # header + padded data
    total = blocks.sum(axis=1)
    start = np.concatenate([[0], np.cumsum(total)[:-1]])                         # first header of a sample
    data = start[:, None] + np.cumsum(blocks, axis=1) - blocks + 512             # data offset of each member
    index = s * PER_SHARD + np.arange(size, dtype=np.int64)
    tar_bytes = int(math.ceil((int(total.sum()) + 1024) / 10240) * 10240)       # end blocks, 10 KB records
    return {"index": index, "label": label, "duration": duration, "sizes": sizes, "data": data, "start": start,
            "range": data[:, -1] + sizes[:, -1] - start, "speaker": rng.integers(0, SPEAKERS, size),
            "group": index // 10, "tar_bytes": np.int64(tar_bytes)}


def sample_key(split: str, i: int) -> str:
    return f"meld-{split}-dia{i // 10}_utt{i % 10}"


_SAMPLE_T = ('  {{\n   "key": "{key}",\n   "label_id": {label},\n   "members": {{\n'
             + ",\n".join(f'    "{e}": [\n     {{o{k}}},\n     {{s{k}}}\n    ]' for k, e in enumerate(EXTS))
             + '\n   }},\n   "duration": {dur}\n  }}')


def _old_stats_dict(split: str, s: int, lay: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the old `ShardStats(...).to_json()` holds for shard s (for the byte-for-byte check)."""
    n = lay["index"].size
    samples = [{"key": sample_key(split, int(i)), "label_id": int(lab),
                "members": {e: [int(o), int(z)] for e, o, z in zip(EXTS, offs.tolist(), sz.tolist())},
                "duration": float(d)}
               for i, lab, offs, sz, d in zip(lay["index"], lay["label"], lay["data"], lay["sizes"], lay["duration"])]
    counts = np.bincount(lay["label"], minlength=len(LABELS))
    return {"shard": shard_name(split, s), "split": split, "samples": samples, "bytes": int(lay["tar_bytes"]),
            "class_counts": {LABELS[c]: int(counts[c]) for c in range(len(LABELS)) if counts[c]},
            "modalities": {"text": n, "audio": n, "video": n}, "duration": round(float(lay["duration"].sum()), 6),
            "skipped": []}


def _old_stats_text(split: str, s: int, lay: dict[str, np.ndarray]) -> str:
    """`json.dumps(stats, indent=1)` of shard s, from string templates (the pure-Python encoder is ~10x slower)."""
    n = lay["index"].size
    counts = np.bincount(lay["label"], minlength=len(LABELS))
    head = {"shard": shard_name(split, s), "split": split, "samples": "@@SAMPLES@@", "bytes": int(lay["tar_bytes"]),
            "class_counts": {LABELS[c]: int(counts[c]) for c in range(len(LABELS)) if counts[c]},
            "modalities": {"text": n, "audio": n, "video": n}, "duration": round(float(lay["duration"].sum()), 6),
            "skipped": []}
    rows = [_SAMPLE_T.format(key=sample_key(split, i), label=lab, dur=repr(d),
                             **{f"o{k}": o for k, o in enumerate(offs)}, **{f"s{k}": z for k, z in enumerate(sz)})
            for i, lab, offs, sz, d in zip(lay["index"].tolist(), lay["label"].tolist(), lay["data"].tolist(),
                                           lay["sizes"].tolist(), lay["duration"].tolist())]
    body = "[\n" + ",\n".join(rows) + "\n ]" if rows else "[]"
    return json.dumps(head, indent=1, ensure_ascii=False).replace('"@@SAMPLES@@"', body) + "\n"


def _complete(folder: Path, spec: dict[str, Any]) -> bool:
    marker = folder / ".bench-complete"
    return marker.exists() and json.loads(marker.read_text()) == spec


def _start_fresh(folder: Path, spec: dict[str, Any]) -> bool:
    """False when `folder` already holds a finished index of `spec`; else an empty folder and True."""
    if _complete(folder, spec):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return True


def _mark(folder: Path, spec: dict[str, Any]) -> None:
    (folder / ".bench-complete").write_text(json.dumps(spec))


def write_old_index(folder: Path, n: int, split: str = "train") -> None:
    """index.json (schema 1) + one stats file per shard, as the old `mmer-dist pack` wrote them."""
    spec = {"format": 1, "n": n, "per_shard": PER_SHARD, "seed": SEED}
    if not _start_fresh(folder, spec):
        return
    names, sizes, keys, labels = [], [], [], []
    counts = np.zeros(len(LABELS), dtype=np.int64)
    duration, total_bytes = 0.0, 0
    for s, size in enumerate(shard_sizes(n)):
        lay = shard_layout(s, size)
        text = _old_stats_text(split, s, lay)
        if s == 0:        # the templates write exactly what json.dump(indent=1) of the old ShardStats writes
            assert text == json.dumps(_old_stats_dict(split, s, lay), indent=1, ensure_ascii=False) + "\n"
        (folder / shard_name(split, s).replace(".tar", ".stats.json")).write_text(text, encoding="utf-8")
        names.append(shard_name(split, s))
        sizes.append(size)
        keys.extend(sample_key(split, int(i)) for i in lay["index"])
        labels.append(lay["label"])
        counts += np.bincount(lay["label"], minlength=len(LABELS))
        duration = round(duration + round(float(lay["duration"].sum()), 6), 6)
        total_bytes += int(lay["tar_bytes"])
    labels_text = ",\n".join(f"    {v}" for v in np.concatenate(labels).tolist())
    keys_text = ",\n".join(f'    "{k}"' for k in keys)
    del keys
    skeleton = {"corpus": "meld", "profile": "train", "labels": list(LABELS),
                "splits": {split: {"shards": names, "sizes": sizes, "keys": "@@KEYS@@", "labels": "@@LABELS@@",
                                   "class_counts": {LABELS[c]: int(counts[c]) for c in range(len(LABELS))},
                                   "modalities": {"text": n, "audio": n, "video": n}, "duration": duration,
                                   "bytes": total_bytes}},
                "schema_version": 1, "extra": {}}
    text = json.dumps(skeleton, indent=1, ensure_ascii=False)
    text = text.replace('"@@KEYS@@"', "[\n" + keys_text + "\n   ]")
    text = text.replace('"@@LABELS@@"', "[\n" + labels_text + "\n   ]")
    (folder / "index.json").write_text(text + "\n", encoding="utf-8")
    _mark(folder, spec)


def write_new_index(folder: Path, n: int, split: str = "train") -> None:
    """samples/{split}/*.npy + index.json (schema 2) with the new code's `write_index` (run with PYTHONPATH=new)."""
    from mmer_dist.shards.merge import write_index
    from mmer_dist.shards.schema import SAMPLE_DTYPE, ShardIndex, SplitIndex

    spec = {"format": 2, "n": n, "per_shard": PER_SHARD, "seed": SEED}
    if not _start_fresh(folder, spec):
        return
    records = np.zeros(n, dtype=SAMPLE_DTYPE)
    si = SplitIndex(class_counts={k: 0 for k in LABELS})
    lo = 0
    for s, size in enumerate(shard_sizes(n)):
        lay = shard_layout(s, size)
        rec = records[lo:lo + size]
        rec["shard"], rec["offset"], rec["size"] = s, lay["start"], lay["range"]
        rec["label"], rec["speaker"], rec["group"], rec["duration"] = (lay["label"], lay["speaker"], lay["group"],
                                                                       lay["duration"])
        counts = np.bincount(lay["label"], minlength=len(LABELS))
        si.shards.append(shard_name(split, s))
        si.sizes.append(size)
        si.shard_bytes.append(int(lay["tar_bytes"]))
        si.shard_classes.append(counts.tolist())
        for c, k in enumerate(LABELS):
            si.class_counts[k] += int(counts[c])
        si.duration = round(si.duration + round(float(lay["duration"].sum()), 6), 6)
        si.bytes += int(lay["tar_bytes"])
        lo += size
    si.modalities = {"text": n, "audio": n, "video": n}
    index = ShardIndex(corpus="meld", profile="train", labels=list(LABELS), splits={split: si},
                       speakers=[f"speaker{k:04d}" for k in range(SPEAKERS)], group_unit="dialogue")
    write_index(folder, index, {split: records})
    _mark(folder, spec)


def write_sample_members(folder: Path, n: int, indices: list[int], split: str = "train") -> None:
    """Real tar headers (zero data: a sparse file) for just these samples, at the offsets both indexes record."""
    by_shard: dict[int, list[int]] = {}
    for i in indices:
        by_shard.setdefault(i // PER_SHARD, []).append(i % PER_SHARD)
    sizes = shard_sizes(n)
    for s, js in by_shard.items():
        lay = shard_layout(s, sizes[s])
        path = folder / shard_name(split, s)
        with open(path, "ab") as f:
            f.truncate(max(path.stat().st_size, int(lay["tar_bytes"])))
        with open(path, "r+b") as f:
            for j in js:
                key = sample_key(split, int(lay["index"][j]))
                for k, ext in enumerate(EXTS):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = int(lay["sizes"][j, k])
                    f.seek(int(lay["data"][j, k]) - 512)
                    f.write(info.tobuf(tarfile.USTAR_FORMAT))


def disk_mb(folder: Path) -> float:
    """Apparent size of the index files (json + npy; not the sparse tars)."""
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".json", ".npy")) / 1e6, 1)


# --------------------------------------------------------------------------- one measurement (a subprocess)

class Tokenizer:
    """A stand-in with the HF call convention (start-up never tokenises)."""

    pad_token_id = 0

    def __call__(self, text: str, truncation: bool = True, max_length: int = 512) -> dict:
        return {"input_ids": [1, 2]}


def _configs(root: Path, weighting: str) -> tuple[Any, Any]:
    from mmer_dist.config import DataConfig, SamplerConfig

    return DataConfig(shards=str(root), batch_size=BATCH, num_workers=0), SamplerConfig(weighting=weighting, seed=SEED)


def _lookup(ds: Any, idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Where the first batch's samples are (shard, offset, size of the first member / the byte range)."""
    if hasattr(ds, "samples"):                                      # new: rows of the compact index
        return list(zip(ds.samples["shard"][idx].tolist(), ds.samples["offset"][idx].tolist(),
                        ds.samples["size"][idx].tolist()))
    out = []
    for i in idx.tolist():                                          # old: per-sample Python objects
        s, entry = ds.locate(i)
        offset, size = entry.members["json"]
        out.append((s, offset, size))
    return out


def run_startup(root: Path, n: int, ranks: int, weighting: str, reads: int = 0, workers: int = 0
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    c0 = _cpu()
    import torch

    torch.set_num_threads(1)
    after_torch = _status_mb("VmRSS")
    c1 = _cpu()
    from mmer_dist.data.build import build_train_loader
    from mmer_dist.shards.schema import load_index

    cfg_data, cfg_sampler = _configs(root, weighting)
    after_import = _status_mb("VmRSS")
    exact_peak = _reset_peak()
    t = [_cpu()]
    index = load_index(root)
    t.append(_cpu())
    loader = build_train_loader(root, cfg_data, cfg_sampler, Tokenizer(), rank=0, world_size=ranks, seed=SEED,
                                index=index)
    t.append(_cpu())
    batch = next(iter(loader.batch_sampler))                         # plans the epoch (the sampler's draw)
    t.append(_cpu())
    idx = np.asarray([item[0] for item in batch], dtype=np.int64)
    where = _lookup(loader.dataset, idx)
    t.append(_cpu())
    peak = _status_mb("VmHWM")
    assert len(loader.dataset) == n and len(where) == BATCH
    fig = {"startup_cpu_s": round(t[-1] - t[0], 3), "rss_mb_above_torch": round(peak - after_torch, 1),
            "cpu_s": {"load_index": round(t[1] - t[0], 3), "build_train_loader": round(t[2] - t[1], 3),
                      "plan": round(t[3] - t[2], 3), "first_batch_lookup": round(t[4] - t[3], 3)},
            "peak_rss_mb": round(peak, 1), "rss_after_torch_mb": round(after_torch, 1),
            "import_mb": round(after_import - after_torch, 1), "import_torch_cpu_s": round(c1 - c0, 3),
            "rss_after_startup_mb": round(_status_mb("VmRSS"), 1), "exact_peak": exact_peak,
            "batches_per_epoch": len(loader), "first_batch_crc": f"{zlib.crc32(idx.tobytes()):08x}"}
    return fig, (run_workers(root, n, loader, after_torch, reads, workers) if workers else None)


def _epoch_lookups(ds: Any, idx: np.ndarray) -> int:
    """The index lookups a worker does for its share of the epoch, without reading tar bytes."""
    if hasattr(ds, "samples"):                                      # new: the rows (the same pages members() maps)
        rows = [ds.samples[c][idx] for c in ("shard", "offset", "size")]
        return int(rows[0].size)
    n = 0
    for i in idx.tolist():                                          # old: the objects _read touches
        _, entry = ds.locate(i)
        n += len(entry.members.items())
    return n


class _WorkerProbe:
    """Item k, in forked worker k: its memory at start, after reading `reads` samples' raw members, after the index
    lookups of its whole share of the rank's epoch, after a full gc.collect()."""

    def __init__(self, ds: Any, reads: list[np.ndarray], shares: list[np.ndarray]) -> None:
        self.ds, self.reads, self.shares = ds, reads, shares

    def __len__(self) -> int:
        return len(self.reads)

    def __getitem__(self, k: int) -> dict[str, Any]:
        at_start = _memory()
        c0 = _cpu()
        nbytes = 0
        for i in self.reads[k].tolist():
            got = self.ds.members(i)
            members = got[1] if isinstance(got, tuple) else got
            nbytes += sum(len(v) for e, v in members.items() if e != "__key__")
        c1 = _cpu()
        after_reads = _memory()
        _epoch_lookups(self.ds, self.shares[k])
        c2 = _cpu()
        after_epoch = _memory()
        gc.collect()
        return {"at_start": at_start, "after_reads": after_reads, "after_epoch_lookups": after_epoch,
                "after_gc": _memory(), "reads": int(self.reads[k].size), "read_mb": round(nbytes / 1e6, 1),
                "read_cpu_s": round(c1 - c0, 3), "epoch_lookups": int(self.shares[k].size),
                "lookup_cpu_s": round(c2 - c1, 3)}


def run_workers(root: Path, n: int, loader: Any, after_torch: float, reads: int, workers: int) -> dict[str, Any]:
    """Fork `workers` DataLoader workers from this rank (after its start-up) and probe their memory."""
    import torch
    from torch.utils.data import DataLoader

    plan = loader.sampler.local_indices()
    write_sample_members(root, n, plan[: reads * workers].tolist())   # tar headers for just those reads
    probe = _WorkerProbe(loader.dataset, [plan[k * reads:(k + 1) * reads] for k in range(workers)],
                         [plan[k::workers] for k in range(workers)])
    rank = {**_memory(), "rss_mb_above_torch": round(_status_mb("VmRSS") - after_torch, 1)}
    dl = DataLoader(probe, batch_size=None, num_workers=workers, collate_fn=lambda x: x)   # forks: the rank's pages
    return {"rank": rank, "workers": list(dl), "start_method": torch.multiprocessing.get_start_method()}


def _softmax_rows(rng: np.random.Generator, b: int) -> np.ndarray:
    z = rng.standard_normal((b, len(LABELS))).astype(np.float32)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def run_eval_old(n: int, ranks: int) -> dict[str, Any]:
    """Every rank's rows -> the all_gather_object payload one rank receives -> unpickle + merge there."""
    import pickle

    import torch

    torch.set_num_threads(1)
    from mmer_dist.data.map_loader import eval_batches
    from mmer_dist.train.metrics import EvalAccumulator, merge_payloads

    keys = [sample_key("dev", i) for i in range(n)]            # the split's keys: in the old index already
    labels = np.random.default_rng(1).choice(len(MIX), size=n, p=MIX)
    rng = np.random.default_rng(2)
    pickled: list[bytes] = []
    rank0 = {}
    for r in range(ranks):
        base, c0 = _status_mb("VmRSS"), _cpu()
        if r == 0:
            _reset_peak()
        acc = EvalAccumulator(list(LABELS))
        for batch in eval_batches(n, EVAL_BATCH, r, ranks):
            idx = [it[0] for it in batch]
            b = len(idx)
            acc.add([keys[i] for i in idx], torch.from_numpy(labels[idx]), torch.from_numpy(_softmax_rows(rng, b)),
                    is_padding=torch.tensor([it[1] for it in batch]),
                    losses=torch.from_numpy(rng.random(b).astype(np.float32)), loss_weights=torch.ones(b))
        if r == 0:
            rank0 = {"rows": len(acc), "acc_peak_mb": round(_status_mb("VmHWM") - base, 1),
                     "acc_cpu_s": round(_cpu() - c0, 3)}
        pickled.append(pickle.dumps(acc.payload()))            # what all_gather_object sends
        del acc
    gc.collect()
    longest = max(len(p) for p in pickled)
    before = _status_mb("VmRSS")
    _reset_peak()
    c0 = _cpu()
    received = bytearray(longest * ranks)                      # torch: world x max_size bytes, then unpickled
    for r, p in enumerate(pickled):
        received[r * longest: r * longest + len(p)] = p
    gathered = [pickle.loads(memoryview(received)[r * longest: r * longest + len(p)]) for r, p in enumerate(pickled)]
    result = merge_payloads(gathered, list(LABELS), expected_keys=keys)
    cpu = _cpu() - c0
    peak = _status_mb("VmHWM")
    return {"received_mb": round(len(received) / 1e6, 1), "merge_peak_mb": round(peak - before, 1),
            "merge_cpu_s": round(cpu, 3), "rank0": rank0, "exact": result.metrics["n"] == n,
            "macro_f1": round(result.metrics["macro_f1"], 6)}


def run_eval_new(n: int, ranks: int) -> dict[str, Any]:
    """Every rank's accumulator over its share; the sums added as the all-reduce does; coverage checked exactly."""
    import pickle

    import torch

    torch.set_num_threads(1)
    from mmer_dist.data.map_loader import EvalBatches
    from mmer_dist.data.seeds import range_digest
    from mmer_dist.train.evaluation import EvalAccumulator
    from mmer_dist.train.metrics import metrics_from_confusion

    keys = [sample_key("dev", i) for i in range(n)]            # what a collated batch carries
    labels = np.random.default_rng(1).choice(len(MIX), size=n, p=MIX)
    rng = np.random.default_rng(2)
    k = len(LABELS)
    total = np.zeros(k * k + 2, dtype=np.int64)
    loss = np.zeros(2)
    rank0 = {}
    for r in range(ranks):
        base, c0 = _status_mb("VmRSS"), _cpu()
        if r == 0:
            _reset_peak()
        acc = EvalAccumulator(list(LABELS))
        for batch in EvalBatches(n, EVAL_BATCH, r, ranks):
            idx = np.asarray([it[0] for it in batch], dtype=np.int64)
            b = idx.size
            collated = {"keys": [keys[i] for i in idx.tolist()], "labels": torch.from_numpy(labels[idx]),
                        "pad": torch.tensor([it[1] for it in batch]), "index": torch.from_numpy(idx),
                        "skipped": {}, "skipped_index": []}
            terms = (torch.from_numpy(rng.random(b).astype(np.float32)), torch.ones(b))
            acc.add(collated, torch.from_numpy(_softmax_rows(rng, b)), terms)
        if r == 0:
            rank0 = {"rows": acc.count, "rank_peak_mb": round(_status_mb("VmHWM") - base, 1),
                     "acc_cpu_s": round(_cpu() - c0, 3)}
        with np.errstate(over="ignore"):                       # int64 sums wrap like the all-reduce's
            total += np.asarray([*acc.cm.ravel().tolist(), acc.count, acc.digest], dtype=np.int64)
        loss += acc.loss
    cm, count, digest = total[: k * k].reshape(k, k), int(total[k * k]), int(total[k * k + 1])
    metrics = metrics_from_confusion(cm, list(LABELS))
    reduced = (k * k + 2) * 8 + 2 * 8                          # the int64 and float64 all-reduce tensors
    reasons = len(pickle.dumps([])) * ranks                    # all_gather_object of the (empty) skip reasons
    return {"received_mb": round((reduced + reasons) / 1e6, 4), "rank0": rank0,
            "exact": count == n and digest == range_digest(n), "macro_f1": round(metrics["macro_f1"], 6)}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    task = spec["task"]
    if task == "gen_new":
        write_new_index(Path(spec["root"]), spec["samples"])
        return {"index_mb": disk_mb(Path(spec["root"]))}
    if task == "startup":
        fig, workers = run_startup(Path(spec["root"]), spec["samples"], spec["world_size"], spec["weighting"],
                                   spec.get("reads", 0), spec.get("workers", 0))
        return {**fig, "worker": workers}
    if task == "eval":
        return (run_eval_old if spec["code"] == "old" else run_eval_new)(spec["samples"], spec["world_size"])
    raise ValueError(task)


# --------------------------------------------------------------------------- the driver

def old_code(cache: Path) -> Path:
    """The old package, extracted once from git (no worktree is created)."""
    out = cache / f"code-{OLD_COMMIT}"
    if not (out / "mmer_dist" / "__init__.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "mmer_dist"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2 ** 20
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(mem, 1),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}


def versions(new_code: Path) -> dict[str, str]:
    head = subprocess.run(["git", "-C", str(new_code), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(new_code), "status", "--porcelain", "mmer_dist"], capture_output=True,
                           text=True, check=False).stdout.strip()
    return {"old": OLD_COMMIT, "new": head + ("+dirty" if dirty else "")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="train split sizes")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512], help="world sizes (rank 0 measured)")
    ap.add_argument("--weightings", nargs="+", default=["none", "inverse"], help="sampler.weighting values")
    ap.add_argument("--old-10m", action="store_true", help="also run the old code at sizes >= 10M (~10 GB per run)")
    ap.add_argument("--only", default="startup,eval", help="comma-separated: startup (+ worker), eval")
    ap.add_argument("--reads", type=int, default=64, help="samples each loader worker reads")
    ap.add_argument("--workers", type=int, default=2, help="loader workers forked by the first start-up of each "
                    "(size, code) (0: no worker figures)")
    ap.add_argument("--eval-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--eval-ranks", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/mmer-bench-index"), help="synthetic indexes (+ old code)")
    ap.add_argument("--keep", action="store_true", help="keep --cache for the next run (default: delete it)")
    ap.add_argument("--old-code", type=Path, help=f"checkout of the old code (default: git archive {OLD_COMMIT})")
    ap.add_argument("--new-code", type=Path, default=REPO)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    only = set(args.only.split(","))
    args.cache.mkdir(parents=True, exist_ok=True)
    code = {"old": args.old_code or old_code(args.cache), "new": args.new_code}
    common = {"machine": machine(), "versions": versions(args.new_code)}
    lines: list[dict[str, Any]] = []

    def sub(which: str, spec: dict[str, Any]) -> dict[str, Any]:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(code[which]))
        c0 = _cpu_with_children()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)], env=env,
                              cwd="/tmp", capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        got["bench_cpu_s"] = round(_cpu_with_children() - c0, 1)      # the whole subprocess (imports, set-up)
        return got

    def emit(bench: str, **fields: Any) -> None:
        line = {"bench": bench, **fields, "loadavg": round(os.getloadavg()[0], 2), **common}
        lines.append(line)
        print(json.dumps(line), flush=True)

    def runs_old(n: int) -> bool:
        return n < 10_000_000 or args.old_10m

    roots: dict[tuple[str, int], Path] = {}
    for n in sorted(set(args.sizes) if "startup" in only else set()):
        for which in ("old", "new"):
            if which == "old" and not runs_old(n):
                continue
            root = roots[which, n] = args.cache / f"{which}-{n}"
            reused = (root / ".bench-complete").exists()
            c0 = _cpu_with_children()
            if which == "old":
                write_old_index(root, n)
                got = {"index_mb": disk_mb(root)}
            else:
                got = sub("new", {"task": "gen_new", "root": str(root), "samples": n})
                got.pop("bench_cpu_s", None)
            emit("index_files", samples=n, code=which, **got, cache=str(root), reused=reused,
                 write_cpu_s=round(_cpu_with_children() - c0, 1))

    if "startup" in only:
        for n in args.sizes:
            for weighting in args.weightings:
                for ranks in args.ranks:
                    for which in ("old", "new"):
                        if (which, n) not in roots:
                            continue
                        probe = weighting == args.weightings[0] and ranks == args.ranks[0] and args.workers > 0
                        got = sub(which, {"task": "startup", "root": str(roots[which, n]), "samples": n,
                                          "world_size": ranks, "weighting": weighting,
                                          "reads": args.reads if probe else 0, "workers": args.workers if probe else 0})
                        worker, cpu = got.pop("worker", None), got.pop("bench_cpu_s", None)
                        emit("startup", samples=n, world_size=ranks, code=which, weighting=weighting, **got,
                             bench_cpu_s=cpu)
                        if worker:
                            emit("worker", samples=n, world_size=ranks, code=which, weighting=weighting, **worker)

    if "eval" in only:
        for n in args.eval_sizes:
            for which in ("old", "new"):
                got = sub(which, {"task": "eval", "code": which, "samples": n, "world_size": args.eval_ranks})
                emit("eval", samples=n, world_size=args.eval_ranks, code=which, **got)

    summary(lines, emit)
    if not args.keep:
        shutil.rmtree(args.cache, ignore_errors=True)


def summary(lines: list[dict[str, Any]], emit: Any) -> None:
    """Old/new ratios of every start-up measured with both codes, and the goal check of the new code."""
    start = {(x["samples"], x["world_size"], x["weighting"], x["code"]): x for x in lines
             if x["bench"] == "startup" and "error" not in x}
    ratios = []
    for (n, r, w, c), x in sorted(start.items()):
        if c == "new" and (n, r, w, "old") in start:
            o = start[n, r, w, "old"]
            ratios.append({"samples": n, "world_size": r, "weighting": w,
                           "cpu_old_over_new": round(o["startup_cpu_s"] / max(x["startup_cpu_s"], 1e-3), 1),
                           "rss_old_over_new": round(o["rss_mb_above_torch"] / max(x["rss_mb_above_torch"], 1.0), 1)})
    goal_runs = [x for (n, r, w, c), x in start.items() if c == "new" and n == GOAL["samples"]]
    goal = None
    if goal_runs:
        cpu = [x["startup_cpu_s"] for x in goal_runs]
        rss = [x["rss_mb_above_torch"] for x in goal_runs]
        goal = {"max_startup_cpu_s": max(cpu), "max_rss_mb_above_torch": max(rss),
                "cpu_spread_over_ranks": round(max(cpu) - min(cpu), 3),
                "rss_spread_over_ranks_mb": round(max(rss) - min(rss), 1),
                "met": max(cpu) < GOAL["startup_cpu_s"] and max(rss) < GOAL["rss_mb_above_torch"]}
    evals = {(x["samples"], x["code"]): x for x in lines if x["bench"] == "eval" and "error" not in x}
    emit("summary", startup_ratios=ratios, goal=GOAL, new_at_goal=goal,
         eval={f"{c}@{n}": {"received_mb": x["received_mb"],
                            "peak_mb": x.get("merge_peak_mb", x["rank0"].get("rank_peak_mb")), "exact": x["exact"]}
               for (n, c), x in sorted(evals.items())})


if __name__ == "__main__":
    main()
