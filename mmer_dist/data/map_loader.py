"""The map-style rank loader (`data.loader=map`, the default): random access into the tars by byte offset.

    dataset = ShardDataset(root, "train", cfg.data, decoder, index=index)    # index.json read by the caller
    loader = build_map_train_loader(dataset, cfg.data, cfg.sampler, rank=r, world_size=R, seed=s)
    dev = build_map_eval_loader(ShardDataset(root, "dev", cfg.data, eval_decoder, index=index), cfg.data, r, R)

* `ShardDataset` reads a sample's members straight from its tar with `os.pread` at the byte
  offsets the packer recorded in `{shard}.stats.json` (no tar scan); file handles are opened
  lazily, per process, so forked DataLoader workers never share a file offset.
* `DistributedWeightedSampler` (mmer_dist.data.sampler) draws the epoch from (seed, epoch):
  weighting `none` = uniform weights without replacement, i.e. a deterministic distributed
  shuffle (one pass; wrap-around duplicates fill the last rank's share); any other weighting
  draws with the configured replacement. `len(sampler)` is the same on every rank by
  construction, the loader has `num_samples // batch_size` batches (drop_last: a partial last
  batch would be of unequal size across ranks and is dropped everywhere).
* Mid-epoch resume goes through the sampler's state: the loader advances the sampler by one
  batch_size of indices per batch handed to the loop (never by what workers prefetched), so
  `state_dict()` taken after a step names exactly the consumed batches; `iter_from(n)` seeks the
  sampler to n x batch_size. Both give the rest of the epoch, identical to an uninterrupted run.
  With length bucketing the epoch's batches are a deterministic function of the sampler's plan,
  so resuming at batch n is exact there too.
* Evaluation: each rank gets an equal-length strided share of the split (`eval_indices`), padded
  by repeats flagged in `batch["pad"]`; drop the flagged rows before any reduction.

Not for `accelerator.prepare` (see mmer_dist.data.loader).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset

from mmer_dist.config import DataConfig, SamplerConfig
from mmer_dist.data.collate import Collator, bucket_batches
from mmer_dist.data.decode import Decoder, DecodeError, Skipped
from mmer_dist.data.loader import SampleCounts, dataloader_settings
from mmer_dist.data.sampler import DistributedWeightedSampler, eval_indices
from mmer_dist.data.seeds import mix
from mmer_dist.shards.schema import SampleEntry, ShardIndex, load_index, read_stats, split_index, stats_name
from mmer_dist.weighting import draw_weights

BUCKET_WINDOW_BATCHES = 32     # length bucketing sorts windows of this many batches of consecutive draws


class ShardDataset(Dataset):
    """Random access to one split of a shards folder: `ds[i]` -> decoded sample dict or `Skipped`.

    `ds[(i, is_padding, epoch, position)]` also works (what the loaders' batch samplers yield):
    the crop is seeded by (decoder seed, epoch, position) and `sample["pad"] = is_padding`.
    """

    def __init__(self, shards_dir: str | Path, split: str, cfg_data: DataConfig, decoder: Decoder,
                 index: ShardIndex | None = None) -> None:
        self.root = Path(shards_dir)
        index = load_index(self.root) if index is None else index
        self.split = split
        sidx = split_index(index, split, self.root)
        self.label_names = list(index.labels)
        self.keys = sidx.keys
        self.shards = [self.root / s for s in sidx.shards]
        self.entries: list[list[SampleEntry]] = []
        for name, size in zip(sidx.shards, sidx.sizes):
            path = self.root / stats_name(name)
            if not path.exists():
                raise FileNotFoundError(f"{path} missing: the index lists shard {name} but its stats file (member "
                                        f"offsets) is gone; re-run the same `mmer-dist pack` command to redo it")
            stats = read_stats(self.root, name)
            if len(stats.samples) != size:
                raise ValueError(f"{path}: {len(stats.samples)} samples but index.json says {size}; "
                                 f"the index is stale: re-run `mmer-dist pack` to merge it again")
            self.entries.append(stats.samples)
        self.starts = np.concatenate([[0], np.cumsum([len(e) for e in self.entries])]).astype(np.int64)
        self.labels = np.asarray(sidx.labels, dtype=np.int64)
        if self.labels.size != self.starts[-1]:
            raise ValueError(f"{self.root}/index.json: split {split} has {self.labels.size} labels for "
                             f"{int(self.starts[-1])} samples in its shards; re-run `mmer-dist pack` to merge it again")
        self.durations = np.asarray([e.duration for es in self.entries for e in es], dtype=np.float64)
        self.class_counts = [int(sidx.class_counts.get(n, 0)) for n in self.label_names]
        self.cfg = cfg_data
        self.decoder = decoder
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:     # file descriptors never cross a process boundary
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def locate(self, i: int) -> tuple[int, SampleEntry]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} outside [0, {len(self)}) of split {self.split}")
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return s, self.entries[s][i - int(self.starts[s])]

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():       # first use in this process (e.g. a fresh worker)
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY)
        return fd

    def members(self, i: int) -> dict[str, Any]:
        """Raw bytes of sample i's members, read at their recorded offsets (a WebDataset-style dict)."""
        return self._read(*self.locate(i))

    def _read(self, s: int, entry: SampleEntry) -> dict[str, Any]:
        fd = self._fd(s)
        out: dict[str, Any] = {"__key__": entry.key}
        for ext, (offset, size) in entry.members.items():
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise OSError(f"{self.shards[s]}: member {entry.key}.{ext} truncated "
                              f"({len(data)} of {size} bytes at offset {offset})")
            out[ext] = data
        return out

    def __getitem__(self, item: Any) -> dict[str, Any] | Skipped:
        return self.load(item)[0]

    def load(self, item: Any) -> tuple[dict[str, Any] | Skipped, dict[str, Any] | None]:
        """(decoded sample or `Skipped`, the raw members it was decoded from; None when unreadable)."""
        if isinstance(item, (tuple, list)):
            i, pad, epoch, pos = int(item[0]), bool(item[1]), int(item[2]), int(item[3])
        else:
            i, pad, epoch, pos = int(item), False, None, int(item)
        key, raw = "?", None
        try:
            s, entry = self.locate(i)
            key = entry.key
            raw = self._read(s, entry)
            sample = self.decoder(raw, index=pos, key=key, epoch=epoch)
        except DecodeError as e:
            return Skipped.from_error(e, pad), raw
        except OSError as e:              # the tar on disk is damaged: skip and count, never crash
            return Skipped(key, "read_error", str(e), pad), None
        sample["pad"] = pad
        return sample, raw



class RankBatchSampler:
    """Batches of this rank's share of the epoch's draw, starting at the sampler's position.

    Yields lists of (index, False, epoch, position) items; `len` is the full epoch's batch count,
    num_samples // batch_size on every rank (drop_last). The sampler's position must be a
    multiple of batch_size (it is when set by the loader: seek(batches x batch_size)).
    """

    def __init__(self, sampler: DistributedWeightedSampler, batch_size: int,
                 lengths: np.ndarray | None = None, window_batches: int = 0, seed: int = 0) -> None:
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.lengths, self.window_batches, self.seed = lengths, int(window_batches), int(seed)

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, bool, int, int]]]:
        b, epoch, start = self.batch_size, self.sampler.epoch, self.sampler.position
        if start % b:
            raise ValueError(f"sampler position {start} is not a multiple of batch_size={b}; "
                             f"resume with seek(batches_done * batch_size)")
        first = start // b
        if self.window_batches and self.lengths is not None:
            plan = self.sampler.local_indices()
            batches = bucket_batches(plan.tolist(), self.lengths, b, self.window_batches,
                                     seed=mix(self.seed, epoch))
            for k in range(first, len(batches)):
                yield [(i, False, epoch, k * b + j) for j, i in enumerate(batches[k])]
            return
        it = iter(self.sampler)            # starts at the sampler's position
        for k in range(first, len(self)):
            yield [(next(it), False, epoch, k * b + j) for j in range(b)]


def _dataloader(dataset: Dataset, batch_sampler: Any, collate: Collator, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, **dataloader_settings(num_workers))


class MapTrainLoader(SampleCounts):
    """The map-style per-rank train loader: fixed batches per epoch, resumable mid-epoch.

    Do not pass it (or `.loader`) to `accelerator.prepare`: it is already split by rank.
    """

    kind = "map"

    def __init__(self, dataset: ShardDataset, sampler: DistributedWeightedSampler, batch_sampler: RankBatchSampler,
                 collate: Collator, num_workers: int) -> None:
        super().__init__()
        self.dataset, self.sampler, self.batch_sampler = dataset, sampler, batch_sampler
        self.label_names, self.class_counts = dataset.label_names, dataset.class_counts
        self.batch_size = batch_sampler.batch_size
        self.loader = _dataloader(dataset, batch_sampler, collate, num_workers)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batches_done(self) -> int:
        return self.sampler.position // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """A new epoch starts at batch 0; the current epoch keeps its position (resume)."""
        self.sampler.set_epoch(epoch)

    def iter_from(self, batches_done: int | None = None) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch, from batch `batches_done` (default: the sampler's position).

        A finished epoch iterated again without `set_epoch(new)` starts over (the same batches,
        like torch's DistributedSampler), never an empty epoch.
        """
        if batches_done is None and self.batches_done >= len(self):
            batches_done = 0
        if batches_done is not None:
            if not 0 <= batches_done <= len(self):
                raise ValueError(f"iter_from({batches_done}): the epoch has {len(self)} batches on this rank")
            self.sampler.seek(int(batches_done) * self.batch_size)
        for batch in self.loader:
            # handed to the loop = consumed: a state_dict() taken after this step resumes after it
            self.sampler.advance(self.batch_size)
            yield self._count(batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(None)

    def state_dict(self) -> dict[str, Any]:
        return {**self._state_header(), "batch_size": self.batch_size, "num_batches": len(self),
                "bucketing": bool(self.batch_sampler.window_batches), "epoch": self.epoch,
                "batches_done": self.batches_done, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its consumed batches; refuses a state of another configuration."""
        self._load_header(state)
        for key, mine in (("batch_size", self.batch_size), ("bucketing", bool(self.batch_sampler.window_batches))):
            if state[key] != mine:
                raise ValueError(f"cannot resume mid-epoch: saved {key}={state[key]} but this run has {mine}; "
                                 f"resume with the original data.batch_size / data.bucket_by_length")
        self.sampler.load_state_dict(state["sampler"])     # checks world size, seed, weights


class MapEvalLoader(SampleCounts):
    """Each sample of the split exactly once over all ranks, the same number of batches on every rank.

    `batch["pad"]` flags the repeats that even out the ranks; drop them before metrics.
    Not for `accelerator.prepare` either (already split by rank).
    """

    def __init__(self, dataset: ShardDataset, batches: list[list[tuple[int, bool, int, int]]], collate: Collator,
                 num_workers: int) -> None:
        super().__init__()
        self.dataset, self.batches = dataset, batches
        self.label_names, self.class_counts = dataset.label_names, dataset.class_counts
        self.keys = dataset.keys
        self.num_padding = sum(1 for b in batches for it in b if it[1])
        self.loader = _dataloader(dataset, batches, collate, num_workers)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self._count(batch)


def eval_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, bool, int, int]]]:
    """This rank's eval batches: ceil(ceil(n / R) / batch_size) on every rank, padding flagged."""
    idx, pad = eval_indices(n, world_size, rank)
    items = [(int(i), bool(p), 0, int(i)) for i, p in zip(idx.tolist(), pad.tolist())]
    return [items[k : k + batch_size] for k in range(0, len(items), batch_size)]


def build_map_train_loader(dataset: ShardDataset, cfg_data: DataConfig, cfg_sampler: SamplerConfig, rank: int,
                           world_size: int, seed: int, collate: Collator) -> MapTrainLoader:
    """This rank's train loader over `dataset`: the configured weighted draw, `num_samples // batch_size` batches."""
    weights, replacement = draw_weights(dataset.labels, dataset.class_counts, cfg_sampler.weighting,
                                        beta=cfg_sampler.beta, manual=cfg_sampler.class_weights,
                                        label_names=dataset.label_names, replacement=cfg_sampler.replacement)
    b = cfg_data.batch_size
    num_samples = cfg_data.steps_per_epoch * b if cfg_data.steps_per_epoch else None
    sampler = DistributedWeightedSampler(weights, num_replicas=world_size, rank=rank, num_samples=num_samples,
                                         seed=seed, replacement=replacement)
    if sampler.num_samples < b:
        raise ValueError(f"split {dataset.split} of {dataset.root}: {len(dataset)} samples over {world_size} ranks "
                         f"give {sampler.num_samples} per rank, fewer than data.batch_size={b}: no full batch. "
                         f"Lower data.batch_size, use fewer processes, or set data.steps_per_epoch")
    window = BUCKET_WINDOW_BATCHES if cfg_data.bucket_by_length else 0
    batch_sampler = RankBatchSampler(sampler, b, dataset.durations, window, seed)
    return MapTrainLoader(dataset, sampler, batch_sampler, collate, cfg_data.num_workers)


def build_map_eval_loader(dataset: ShardDataset, cfg_data: DataConfig, rank: int, world_size: int,
                          collate: Collator) -> MapEvalLoader:
    """This rank's eval loader over `dataset` (centre crops, no shuffle, padding flagged)."""
    if len(dataset) == 0:
        raise ValueError(f"split {dataset.split} of {dataset.root} has no samples to evaluate")
    batches = eval_batches(len(dataset), cfg_data.eval_batch_size, rank, world_size)
    return MapEvalLoader(dataset, batches, collate, cfg_data.num_workers)
