"""Random access to the samples of one split: one read per sample at the byte range of the compact index.

    ds = ShardDataset(root, "train", cfg.data, decoder, index=index)
    ds[i]                      # decoded sample dict (key, label, tensors, "index": i), or a `Skipped` marker
    key, members = ds.members(i)        # the raw bytes: {"json": b"...", "txt": b"...", "flac": b"..."}

* The split's compact index (mmer_dist.shards.schema.Samples) gives shard, byte range, label,
  speaker, group and duration of every sample, memory-mapped: nothing per sample is built in Python.
* Files are opened through `ShardFiles`, a per-process cache of at most `capacity` descriptors and a
  quarter of the file limit (least recently used closed first), so 10k shards never meet the common
  1,024-file limit; the soft limit is raised to the hard one once per process.
* Local folders only (a path or file://): a URL is refused with the fixes (`map_refusal`).
* A read that fails or comes back short on a shard the index calls complete is not a skip: it becomes
  a fatal `Skipped` marker that the rank loader turns into a `DataError` naming the shard, the byte
  range and the fix (verify, re-pack). A sample that reads but fails to decode is a counted skip.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import get_worker_info

from mmer_dist.config import ConfigError, DataConfig
from mmer_dist.data.decode import Decoder, DecodeError, Skipped
from mmer_dist.shards.location import Location
from mmer_dist.shards.schema import (SampleRows, Samples, ShardIndex, load_index, split_index, split_members,
                                     split_samples)

DEFAULT_OPEN_FILES = 64
"""Descriptors a process keeps open per dataset (train and eval each have their own cache)."""
MAX_WORKERS = 64
"""DataLoader workers whose current sample is tracked for error messages."""


def map_refusal(location: Location) -> str:
    """Why random access (data.loader=map) does not read `location`, and the two fixes (mmer_dist.data.build says
    why a local copy is not filled instead)."""
    url = location.shown()
    copy = (f"aws s3 sync {url} /scratch/shards" if url.startswith("s3") else
            f"gsutil -m rsync -r {url} /scratch/shards" if url.startswith("gs://") else "rclone copy ... /scratch/shards")
    return (f"data.shards={url} is not a local folder, and data.loader=map reads one byte range per sample at "
            f"random (~150k requests/s at 300 samples/s on 512 GPUs, beyond what object storage serves). Set "
            f"data.loader=stream (whole tars read front to back), or copy the shards to a filesystem (`{copy}`) "
            f"and set data.shards to that folder")


def raise_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (where allowed); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class ShardFiles:
    """Open shard files of this process, at most `capacity` at once (LRU); reopened after a fork."""

    def __init__(self, paths: list[Path], capacity: int = DEFAULT_OPEN_FILES) -> None:
        self.paths, self.capacity = paths, max(1, int(capacity))
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = -1

    def pread(self, shard: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of shard `shard`; OSError (with the file named) when it cannot be read."""
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset} (the file is truncated)")
        return data

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():           # a fresh worker process: the parent's descriptors are not ours
            self._fds, self._pid = OrderedDict(), os.getpid()
            # a quarter of the file limit at most: the process has other files, and other datasets
            self._limit = max(1, min(self.capacity, raise_file_limit() // 4))
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        while len(self._fds) >= self._limit:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def close(self, _getpid: Any = os.getpid, _close: Any = os.close) -> None:
        # os bound at definition: __del__ may run while the interpreter is tearing modules down
        if self._pid == _getpid():
            for fd in self._fds.values():
                try:
                    _close(fd)
                except OSError:
                    pass
        self._fds.clear()

    def __getstate__(self) -> dict[str, Any]:     # descriptors never cross a process boundary
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": -1}

    def __del__(self) -> None:
        self.close()


class ShardDataset:
    """Random access to one split of a shards folder: `ds[i]` -> decoded sample dict or `Skipped`.

    `ds[(i, is_padding, epoch, position)]` also works (what the loaders' batch samplers yield):
    the crop is seeded by (decoder seed, epoch, position) and `sample["pad"] = is_padding`.
    """

    def __init__(self, shards_dir: str | Path | Location, split: str, cfg_data: DataConfig, decoder: Decoder,
                 index: ShardIndex | None = None, open_files: int = DEFAULT_OPEN_FILES,
                 rows: np.ndarray | None = None) -> None:
        """`rows`: positions in `split` of the samples to serve (a training-time fold), default all of them.
        A location that is not a local folder is refused (ConfigError naming the fixes)."""
        location = shards_dir if isinstance(shards_dir, Location) else Location(shards_dir)
        if not location.is_local:
            raise ConfigError(map_refusal(location))
        self.root = location.root
        index = load_index(location) if index is None else index
        sidx = split_index(index, split, self.root)
        self.split, self.label_names = split, list(index.labels)
        self.speakers, self.group_unit = list(index.speakers), index.group_unit
        self.shard_names = list(sidx.shards)
        samples = split_samples(index, split)
        self.samples: Samples | SampleRows = samples if rows is None else SampleRows(samples, rows)
        self.class_counts = ([int(sidx.class_counts.get(n, 0)) for n in self.label_names] if rows is None else
                             np.bincount(self.labels, minlength=len(self.label_names)).tolist())
        self.files = ShardFiles([self.root / s for s in self.shard_names], open_files)
        self.cfg, self.decoder = cfg_data, decoder
        # what each DataLoader worker reads now (shared memory, inherited by forked workers): named in the
        # error when a worker dies or stalls
        self.reading = multiprocessing.RawArray("q", [-1] * MAX_WORKERS)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> Any:
        """Label id of every sample (a memory-mapped int16 column)."""
        return self.samples["label"]

    @property
    def durations(self) -> Any:
        """Audio seconds of every sample (a memory-mapped float32 column)."""
        return self.samples["duration"]

    def readers(self) -> str:
        """What each DataLoader worker was reading last, for an error message."""
        return "; ".join(f"worker {w}: {self.where(i)}" for w, i in enumerate(self.reading) if i >= 0) or "nothing yet"

    def where(self, i: int) -> str:
        """`shard (bytes a..b)` of sample i, for messages."""
        s, off, size = int(self.samples["shard"][i]), int(self.samples["offset"][i]), int(self.samples["size"][i])
        return f"{self.root / self.shard_names[s]} (sample {i} of split {self.split}, bytes {off}..{off + size})"

    def members(self, i: int) -> tuple[str, dict[str, Any]]:
        """(key, raw members) of sample i: one read of its byte range, parsed in memory. OSError / ValueError
        name the shard when the bytes cannot be read or are not the sample's tar members."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} outside [0, {len(self)}) of split {self.split}")
        s = int(self.samples["shard"][i])
        blob = self.files.pread(s, int(self.samples["offset"][i]), int(self.samples["size"][i]))
        key, members = split_members(blob, self.where(i))
        return key, {"__key__": key, **members}

    def __getitem__(self, item: Any) -> dict[str, Any] | Skipped:
        return self.load(item)[0]

    def load(self, item: Any) -> tuple[dict[str, Any] | Skipped, dict[str, Any] | None]:
        """(decoded sample or `Skipped`, the raw members it was decoded from; None when unreadable)."""
        if isinstance(item, (tuple, list)):
            i, pad, epoch, pos = int(item[0]), bool(item[1]), int(item[2]), int(item[3])
        else:
            i, pad, epoch, pos = int(item), False, None, int(item)
        worker = get_worker_info()
        if worker is not None and worker.id < MAX_WORKERS:
            self.reading[worker.id] = i
        try:
            key, raw = self.members(i)
        except (OSError, ValueError) as e:   # the index says the shard is complete: damage, not a bad input
            return Skipped("?", "read_error", f"{self.where(i)}: {e}", pad, fatal=True, index=i), None
        try:
            sample = self.decoder(raw, index=pos, key=key, epoch=epoch)
        except DecodeError as e:
            return Skipped.from_error(e, pad, index=i, where=self.where(i)), raw
        sample["pad"], sample["index"] = pad, i
        return sample, raw
