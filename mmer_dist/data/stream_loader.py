"""The streaming rank loader (`data.loader=stream`, and every shards URL): an explicit WebDataset pipeline.

    shards = SplitShards.of(location, index, "train")         # mmer_dist.data.shard_stream
    loader = StreamLoader(shards, class_counts, labels, cfg.data, cfg.sampler, decoder, collate, rank, R, seed)
    StreamPlan(sizes, batch_size, world_size, num_workers, resample)  # the epoch arithmetic, or a refusal

Why it exists: for corpora too large to index per sample, and for shards that live behind a URL
(object storage, HTTP, a `pipe:` command). The map-style loader (mmer_dist.data.map_loader) reads one
byte range per sample at random; the stream reads each tar front to back (one sequential read per
shard, what network and object storage serve well) and needs only the index's shard list, shard
sizes and class counts.

* `stream_pipeline` is the pipeline, one commented stage per line: shard source (resampled, the
  default, or each shard once with an explicit rank split then worker split), tar -> samples with
  their split positions (retried reads, mmer_dist.data.shard_stream), shuffle buffer, label from
  KEY.json, optional class balance (mmer_dist.data.balance), decode, collate.
* `StreamPlan` gives every rank and every worker exactly the same number of batches per epoch,
  computed from the index; configurations that cannot hold that are refused with the numbers and
  the fix (e.g. fewer shards than ranks x workers without resampling).
* A shard that cannot be read (after the retries), is damaged or holds another number of samples than
  the index says ends the run with a `DataError` naming its URL; unreadable KEY.json and decode failures
  are counted `Skipped` markers inside the batches.
* Resume inside an epoch replays the (deterministic) stream and discards the consumed batches.
  Every seed comes from `mmer_dist.data.seeds.mix` over (seed, epoch, rank, worker).

Not for `accelerator.prepare` (see mmer_dist.data.loader).
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator

import numpy as np
from torch.utils.data import DataLoader

from mmer_dist.config import DataConfig, SamplerConfig
from mmer_dist.data.balance import ClassBalancedStream
from mmer_dist.data.collate import Collator
from mmer_dist.data.decode import Decoder
from mmer_dist.data.loader import SampleCounts, batches_of, dataloader_settings
from mmer_dist.data.seeds import mix
from mmer_dist.data.shard_stream import (Pending, SplitShards, StreamDecode, emit_pending, label_or_park, read_shards,
                                         split_by_rank, worker, worker_shares)
from mmer_dist.weighting import class_target_distribution, class_weights

# --------------------------------------------------------------------------- seeds


class _WorkerSeed:
    """worker_seed for wds.ResampledShards: distinct per (rank, worker); picklable."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 100_003 + worker()[0]


class _WorkerShuffle:
    """wds shuffle with an rng seeded by (seed, epoch, rank, worker): reproducible and distinct per worker."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        from webdataset.filters import _shuffle

        rng = random.Random(mix(self.seed, self.epoch, self.rank, worker()[0]))
        return _shuffle(src, self.bufsize, min(self.bufsize, 100), rng=rng)


# --------------------------------------------------------------------------- plan, pipeline, loader


class StreamPlan:
    """The streaming epoch, computed from the index: batches per worker and per rank, or a refusal."""

    def __init__(self, sizes: list[int], batch_size: int, world_size: int, num_workers: int, resample: bool,
                 steps_per_epoch: int = 0, where: str = "") -> None:
        self.workers = max(1, num_workers)
        shards, n = len(sizes), int(sum(sizes))
        b, r, w = batch_size, world_size, self.workers
        if n == 0:
            raise ValueError(f"{where}: the split has no samples")
        steps = steps_per_epoch or n // (b * r)
        if steps == 0:
            raise ValueError(f"{where}: {n} samples < one global batch (data.batch_size={b} x {r} ranks = {b * r}); "
                             f"lower data.batch_size, use fewer processes or set data.steps_per_epoch")
        if resample:
            self.per_worker = math.ceil(steps / w)
        else:
            if shards < r * w:
                raise ValueError(
                    f"{where}: streaming without resampling needs at least world size x workers shards so every "
                    f"worker gets one, but there are {shards} shards for {r} ranks x {w} workers = {r * w}. "
                    f"Fix: set data.stream_resample=true (equal epochs by resampling), or data.num_workers <= "
                    f"{max(1, shards // r) if shards >= r else 0}{' and fewer ranks' if shards < r else ''}, "
                    f"or repack with smaller shards (at least {r * w}), or use data.loader=map")
            # worker w of rank r reads shards (r + R*k) for k = w, w + W, ...: its share of the samples
            shares = sum(worker_shares(sizes, r, w), [])
            limit = min(shares) // b
            if limit == 0:
                raise ValueError(f"{where}: without resampling the smallest worker share holds {min(shares)} samples, "
                                 f"less than data.batch_size={b}; set data.stream_resample=true or use fewer workers")
            wanted = math.ceil(steps_per_epoch / w) if steps_per_epoch else limit
            if wanted > limit:
                raise ValueError(f"{where}: data.steps_per_epoch={steps_per_epoch} needs {wanted} batches per worker but "
                                 f"the smallest worker share holds {limit} without repeating; set data.stream_resample=true "
                                 f"or data.steps_per_epoch <= {limit * w}")
            self.per_worker = wanted
        self.per_rank = self.per_worker * w


def stream_pipeline(shards: SplitShards, cfg_data: DataConfig, decoder: Decoder, collate: Collator, rank: int,
                    world_size: int, epoch: int, seed: int, per_worker: int,
                    balance: ClassBalancedStream | None = None) -> Any:
    """The explicit WebDataset pipeline of one rank; each worker yields exactly `per_worker` batches."""
    import webdataset as wds

    pending = Pending()
    if cfg_data.stream_resample:
        # an endless shard stream per (rank, worker), seeded by (seed, epoch) and (rank, worker):
        # the seed is the node/worker split, no shard list to divide
        source = [wds.ResampledShards(shards.names, seed=mix(seed, epoch), worker_seed=_WorkerSeed(rank),
                                      deterministic=True)]
    else:
        source = [
            wds.SimpleShardList(shards.names),                                   # every shard, index order
            wds.filters.pipelinefilter(split_by_rank)(rank, world_size),         # node split: shard i -> rank i % R
            wds.split_by_worker,                                                 # worker split within the rank
        ]
    if balance is not None:
        balance.set_epoch(epoch)
    pipeline = wds.DataPipeline(
        *source,
        wds.filters.pipelinefilter(read_shards)(shards),         # tar -> {__key__, __index__, json, txt, flac, ...}
        _WorkerShuffle(cfg_data.shuffle_buffer, seed, epoch, rank),  # sample shuffle buffer, per-worker seed
        wds.filters.pipelinefilter(label_or_park)(pending),      # label from KEY.json (unreadable -> skip)
        balance,                                                 # optional class-balanced resampling (None = off)
        wds.filters.pipelinefilter(emit_pending)(pending),       # parked skips -> Skipped markers
        wds.map(StreamDecode(decoder, epoch)),                   # decode after the shuffle, in the worker
        wds.batched(cfg_data.batch_size, collation_fn=collate, partial=False),  # pad + masks; full batches only
    )
    # exactly per_worker batches from every worker (repeating the pass if the source ends early)
    return pipeline.with_epoch(nbatches=per_worker)


class StreamLoader(SampleCounts):
    """The streaming per-rank train loader: `len` batches per epoch on every rank. Not for `prepare`.

    `shards`: the split's shards in index order with their sample counts, `class_counts` the split's
    per class (label-id order): all from the index, which the caller read once.
    """

    kind = "stream"

    def __init__(self, shards: SplitShards, class_counts: list[int], label_names: list[str],
                 cfg_data: DataConfig, cfg_sampler: SamplerConfig, decoder: Decoder, collate: Collator,
                 rank: int, world_size: int, seed: int, where: str = "") -> None:
        super().__init__()
        self.shards, self.label_names, self.class_counts = shards, list(label_names), list(class_counts)
        self.cfg, self.decoder, self.collate = cfg_data, decoder, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.plan = StreamPlan(shards.sizes, cfg_data.batch_size, world_size, cfg_data.num_workers,
                               cfg_data.stream_resample, cfg_data.steps_per_epoch, where=f"{where} (data.loader=stream)")
        self.balance_target: np.ndarray | None = None
        if cfg_sampler.weighting != "none":
            cw = class_weights(self.class_counts, cfg_sampler.weighting, beta=cfg_sampler.beta,
                               manual=cfg_sampler.class_weights or None, label_names=self.label_names)
            self.balance_target = class_target_distribution(self.class_counts, cw)
        self.epoch, self._start = 0, 0

    def __len__(self) -> int:
        return self.plan.per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
            self._new_epoch()
        self.epoch = int(epoch)

    @property
    def epoch_done(self) -> bool:
        return self._start >= len(self)

    def pipeline(self) -> Any:
        balance = None
        if self.balance_target is not None:
            balance = ClassBalancedStream(self.balance_target, seed=mix(self.seed, self.rank), rank=self.rank)
        return stream_pipeline(self.shards, self.cfg, self.decoder, self.collate, self.rank, self.world_size,
                               self.epoch, self.seed, self.plan.per_worker, balance)

    def iter_from(self, batches_done: int | None = None) -> Iterator[dict[str, Any]]:
        """The rest of the epoch; resuming at batch n replays the deterministic stream and drops n batches."""
        start = self._start if batches_done is None else int(batches_done)
        loader = DataLoader(self.pipeline(), batch_size=None, num_workers=self.cfg.num_workers,
                            **dataloader_settings(self.cfg.num_workers, self.cfg.loader_timeout_s))
        for k, batch in enumerate(batches_of(loader, lambda: f"rank {self.rank}'s shards of {self.shards.where()}")):
            if k < start:
                continue
            self._start = k + 1
            yield self._count(batch)
        self._start = 0 if self._start >= len(self) else self._start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(None)

    def state_dict(self) -> dict[str, Any]:
        return {**self._state_header(), "epoch": self.epoch, "batches_done": self._start,
                "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_header(state)
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(f"cannot resume the stream: saved world_size={state['world_size']} seed={state['seed']}, "
                             f"this run {self.world_size}/{self.seed}; resume with the original launch")
        self.epoch, self._start = int(state["epoch"]), int(state["batches_done"])
