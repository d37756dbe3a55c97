"""The map-style rank loader (`data.loader=map`, the default): random access into the tars by byte offset.

    dataset = ShardDataset(root, "train", cfg.data, decoder, index=index)    # mmer_dist.data.shard_reader
    loader = build_map_train_loader(dataset, cfg.data, cfg.sampler, rank=r, world_size=R, seed=s)
    dev = build_map_eval_loader(ShardDataset(root, "dev", cfg.data, eval_decoder, index=index), cfg.data, r, R)

* `ShardDataset` (mmer_dist.data.shard_reader) reads a sample's members with one `os.pread` at the
  byte range of the split's compact index, through a bounded per-process cache of open files.
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
  so resuming at batch n is exact there too. Resumed on another number of ranks, the epoch's
  remaining positions are re-divided (mmer_dist.data.sampler, "Elastic resume"): the same multiset of
  samples as the uninterrupted epoch, the last batch possibly partial (or empty on some ranks).
* Evaluation: each rank gets an equal-length strided share of the split (`eval_indices`), padded
  by repeats flagged in `batch["pad"]`; drop the flagged rows before any reduction.

Not for `accelerator.prepare` (see mmer_dist.data.loader).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset

from mmer_dist.config import DataConfig, SamplerConfig
from mmer_dist.data.collate import Collator, bucket_batches
from mmer_dist.data.loader import SampleCounts, batches_of, dataloader_settings
from mmer_dist.data.sampler import DistributedWeightedSampler, eval_indices_at
from mmer_dist.data.seeds import mix
from mmer_dist.data.shard_reader import ShardDataset
from mmer_dist.weighting import draw_weights

BUCKET_WINDOW_BATCHES = 32     # length bucketing sorts windows of this many batches of consecutive draws


class RankBatchSampler:
    """Batches of this rank's share of the epoch's draw, from the sampler's position to its layout's end.

    Yields lists of (index, False, epoch, position) items. `len` is the layout's batch count, the same on
    every rank: a fresh epoch is `num_samples // batch_size` full batches (the sampler's layout covers
    exactly that many positions); an epoch resumed on another number of ranks may end with a partial
    batch, and a rank whose share ran out first gets an empty one, so every rank runs the same steps.
    The sampler's position must be a multiple of batch_size (the loader seeks to batches x batch_size).
    """

    def __init__(self, sampler: DistributedWeightedSampler, batch_size: int,
                 lengths: np.ndarray | None = None, window_batches: int = 0, seed: int = 0) -> None:
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.lengths, self.window_batches, self.seed = lengths, int(window_batches), int(seed)

    def __len__(self) -> int:
        return math.ceil(self.sampler.rank_size(0) / self.batch_size)     # rank 0 owns the most positions

    def batches(self) -> list[list[int]]:
        """This rank's batches of dataset indices for the whole layout (empty ones last, to equal `len`)."""
        b, plan = self.batch_size, self.sampler.local_indices()
        if self.window_batches and self.lengths is not None:
            out = bucket_batches(plan.tolist(), self.lengths, b, self.window_batches,
                                 seed=mix(self.seed, self.sampler.epoch), drop_last=False)
        else:
            out = [plan[k: k + b].tolist() for k in range(0, plan.size, b)]
        return out + [[]] * (len(self) - len(out))

    def __iter__(self) -> Iterator[list[tuple[int, bool, int, int]]]:
        b, epoch, start = self.batch_size, self.sampler.epoch, self.sampler.position
        if start % b:
            raise ValueError(f"sampler position {start} is not a multiple of batch_size={b}; "
                             f"resume with seek(batches_done * batch_size)")
        if not self.window_batches:          # plain order: read the plan lazily, batch by batch
            it = iter(self.sampler)         # starts at the sampler's position
            for k in range(start // b, len(self)):
                yield [(i, False, epoch, k * b + j) for j, i in zip(range(b), it)]
            return
        batches = self.batches()
        for k in range(start // b, len(batches)):
            yield [(i, False, epoch, k * b + j) for j, i in enumerate(batches[k])]


def _dataloader(dataset: Dataset, batch_sampler: Any, collate: Collator, cfg: DataConfig) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=cfg.num_workers,
                      persistent_workers=cfg.num_workers > 0,
                      **dataloader_settings(cfg.num_workers, cfg.loader_timeout_s))


class MapTrainLoader(SampleCounts):
    """The map-style per-rank train loader: fixed batches per epoch, resumable mid-epoch.

    Do not pass it (or `.loader`) to `accelerator.prepare`: it is already split by rank.
    """

    kind = "map"

    def __init__(self, dataset: ShardDataset, sampler: DistributedWeightedSampler, batch_sampler: RankBatchSampler,
                 collate: Collator) -> None:
        super().__init__()
        self.dataset, self.sampler, self.batch_sampler = dataset, sampler, batch_sampler
        self.label_names, self.class_counts = dataset.label_names, dataset.class_counts
        self.batch_size = batch_sampler.batch_size
        self.loader = _dataloader(dataset, batch_sampler, collate, dataset.cfg)
        self._batches_done = 0

    def __len__(self) -> int:
        """Batches of the current epoch (its remaining layout after an elastic resume), equal on every rank."""
        return len(self.batch_sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batches_done(self) -> int:
        return self._batches_done

    @property
    def epoch_done(self) -> bool:
        return self._batches_done >= len(self)

    def set_epoch(self, epoch: int) -> None:
        """A new epoch starts at batch 0; the current epoch keeps its position (resume)."""
        if epoch != self.sampler.epoch:
            self._batches_done = 0
            self._new_epoch()
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
            self._batches_done = int(batches_done)
            self.sampler.seek(min(self.sampler.rank_size(), self._batches_done * self.batch_size))
        for batch in batches_of(self.loader, self.dataset.readers):
            # handed to the loop = consumed: a state_dict() taken after this step resumes after it
            self.sampler.advance(self.batch_size)
            self._batches_done += 1
            yield self._count(batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(None)

    def state_dict(self) -> dict[str, Any]:
        return {**self._state_header(), "batch_size": self.batch_size, "num_batches": len(self),
                "bucketing": bool(self.batch_sampler.window_batches), "epoch": self.epoch,
                "batches_done": self.batches_done, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its consumed batches, on this run's number of ranks (the positions
        left are re-divided when it differs); refuses a state of another configuration."""
        self._load_header(state)
        saved_world = state["sampler"]["num_replicas"]
        same_world = saved_world == self.sampler.num_replicas
        # on another world size the per-rank batch may differ (data.global_batch_size): the layout restarts
        for key, mine in (("batch_size", self.batch_size), ("bucketing", bool(self.batch_sampler.window_batches))):
            if state[key] != mine and (same_world or key == "bucketing"):
                raise ValueError(f"cannot resume mid-epoch: saved {key}={state[key]} but this run has {mine}; "
                                 f"resume with the original data.batch_size / data.bucket_by_length")
        if not same_world and self.batch_sampler.window_batches and state["batches_done"]:
            raise ValueError(f"cannot resume mid-epoch on {self.sampler.num_replicas} ranks: the epoch was cut into "
                             f"length buckets per rank on {saved_world} ranks (data.bucket_by_length), so the samples "
                             f"left are not a range of the draw that can be re-divided. Resume with {saved_world} "
                             f"processes (elastic resume works with data.bucket_by_length=false)")
        self.sampler.load_state_dict(state["sampler"])     # checks seed and weights; re-divides on a new world size
        self._batches_done = int(state["batches_done"]) if same_world else 0


class EvalBatches:
    """This rank's eval batches, computed on the fly: ceil(ceil(n / R) / batch_size) on every rank, strided
    positions (rank r gets r, r+R, ...), padding repeats flagged. Constant memory whatever n is."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.per_rank = math.ceil(n / world_size)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, bool, int, int]]]:
        for k in range(len(self)):
            t = np.arange(k * self.batch_size, min((k + 1) * self.batch_size, self.per_rank), dtype=np.int64)
            idx, pad = eval_indices_at(t, self.n, self.rank, self.world_size)
            yield [(int(i), bool(p), 0, int(i)) for i, p in zip(idx.tolist(), pad.tolist())]


class MapEvalLoader(SampleCounts):
    """Each sample of the split exactly once over all ranks, the same number of batches on every rank.

    `batch["pad"]` flags the repeats that even out the ranks; drop them before metrics.
    Not for `accelerator.prepare` either (already split by rank).
    """

    def __init__(self, dataset: ShardDataset, batches: EvalBatches, collate: Collator) -> None:
        super().__init__()
        self.dataset, self.batches = dataset, batches
        self.label_names, self.class_counts = dataset.label_names, dataset.class_counts
        self.num_samples = len(dataset)
        self.samples, self.speakers, self.group_unit = dataset.samples, dataset.speakers, dataset.group_unit
        self.loader = _dataloader(dataset, batches, collate, dataset.cfg)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in batches_of(self.loader, self.dataset.readers):
            yield self._count(batch)


def build_map_train_loader(dataset: ShardDataset, cfg_data: DataConfig, cfg_sampler: SamplerConfig, rank: int,
                           world_size: int, seed: int, collate: Collator) -> MapTrainLoader:
    """This rank's train loader over `dataset`: the configured weighted draw, `num_samples // batch_size` batches."""
    weights, replacement = draw_weights(dataset.labels, dataset.class_counts, cfg_sampler.weighting,
                                        beta=cfg_sampler.beta, manual=cfg_sampler.class_weights,
                                        label_names=dataset.label_names, replacement=cfg_sampler.replacement)
    b = cfg_data.batch_size
    num_samples = cfg_data.steps_per_epoch * b if cfg_data.steps_per_epoch else None
    sampler = DistributedWeightedSampler(weights, num_replicas=world_size, rank=rank, num_samples=num_samples,
                                         seed=seed, replacement=replacement, epoch_batch=b)
    if sampler.num_samples < b:
        raise ValueError(f"split {dataset.split} of {dataset.root}: {len(dataset)} samples over {world_size} ranks "
                         f"give {sampler.num_samples} per rank, fewer than data.batch_size={b}: no full batch. "
                         f"Lower data.batch_size, use fewer processes, or set data.steps_per_epoch")
    window = BUCKET_WINDOW_BATCHES if cfg_data.bucket_by_length else 0
    batch_sampler = RankBatchSampler(sampler, b, dataset.durations, window, seed)
    return MapTrainLoader(dataset, sampler, batch_sampler, collate)


def build_map_eval_loader(dataset: ShardDataset, cfg_data: DataConfig, rank: int, world_size: int,
                          collate: Collator) -> MapEvalLoader:
    """This rank's eval loader over `dataset` (centre crops, no shuffle, padding flagged)."""
    if len(dataset) == 0:
        raise ValueError(f"split {dataset.split} of {dataset.root} has no samples to evaluate")
    batches = EvalBatches(len(dataset), cfg_data.eval_batch_size, rank, world_size)
    return MapEvalLoader(dataset, batches, collate)
