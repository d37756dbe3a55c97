"""The streaming eval loader: each sample of a split exactly once over all ranks, reading whole shards.

    loader = StreamEvalLoader(SplitShards.of(location, index, "dev"), index, cfg.data, decoder, collate, rank, R)
    for batch in loader: ...        # len(loader) batches on every rank; drop the rows flagged batch["pad"]

What `data.loader=stream` and every shards URL evaluate with (mmer_dist.data.build): the counterpart of
the map-style `EvalBatches` for shards that are read front to back.

* Shard i goes to rank i % R and the rank's k-th shard to its worker k % W (the training stream's split
  without resampling); each sample carries its split position (mmer_dist.data.shard_stream), which
  the evaluator's exact coverage check and the prediction rows use.
* Every worker yields exactly `per_worker` batches: its samples in batches of `data.eval_batch_size` (the
  last one partial), then padding batches of one repeat flagged `pad` (the worker's first sample, or the
  split's first decodable sample for a worker without a shard), so every rank runs `len(loader)` batches.
* Workers: at most one per shard of a rank (`min(data.num_workers, shards // R)`), which keeps padding rare.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader

from mmer_dist.config import DataConfig
from mmer_dist.data.collate import Collator
from mmer_dist.data.decode import Decoder
from mmer_dist.data.loader import DataError, SampleCounts, batches_of, dataloader_settings
from mmer_dist.data.shard_stream import SplitShards, StreamDecode, read_shards, split_by_rank, worker_shares
from mmer_dist.shards.schema import Samples, ShardIndex, split_samples


def padded_batches(src: Iterator[Any], batch_size: int, per_worker: int, collate: Collator,
                   fallback: Callable[[], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Batches of the samples of `src`, then one-sample padding batches (flagged) up to `per_worker` batches."""
    batch: list[Any] = []
    done, first = 0, None
    for sample in src:
        if first is None and isinstance(sample, dict):
            first = sample
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            done, batch = done + 1, []
    if batch:
        yield collate(batch)
        done += 1
    if done < per_worker:
        pad = {**(first if first is not None else fallback()), "pad": True}
        for _ in range(per_worker - done):
            yield collate([pad])


class FirstSample:
    """The split's first decodable sample (padding for a worker that read none); picklable."""

    def __init__(self, shards: SplitShards, decoder: Decoder) -> None:
        self.shards, self.decoder = shards, decoder

    def __call__(self) -> dict[str, Any]:
        decode = StreamDecode(self.decoder, 0)
        for name in self.shards.names:
            for sample in read_shards(iter([{"url": name}]), self.shards):
                out = decode(sample)
                if isinstance(out, dict):
                    return out
        raise DataError(f"no sample of {self.shards.where()} decodes: nothing to evaluate")


class StreamEvalLoader(SampleCounts):
    """This rank's eval batches of one split, streamed; `len` equal on every rank. Not for `accelerator.prepare`."""

    def __init__(self, shards: SplitShards, index: ShardIndex, split: str, cfg_data: DataConfig, decoder: Decoder,
                 collate: Collator, rank: int, world_size: int) -> None:
        super().__init__()
        self.shards, self.index, self.split = shards, index, split
        self.cfg, self.decoder, self.collate, self.rank, self.world_size = cfg_data, decoder, collate, rank, world_size
        self.label_names = list(index.labels)
        si = index.splits[split]
        self.class_counts = [int(si.class_counts.get(n, 0)) for n in self.label_names]
        self.num_samples = si.num_samples
        if self.num_samples == 0:
            raise ValueError(f"split {split} of {shards.location} has no samples to evaluate")
        self.speakers, self.group_unit = list(index.speakers), index.group_unit
        self.workers = min(cfg_data.num_workers, max(1, len(shards.names) // world_size))
        shares = sum(worker_shares(shards.sizes, world_size, max(1, self.workers)), [])
        self.per_worker = max(1, max(math.ceil(n / cfg_data.eval_batch_size) for n in shares))

    def __len__(self) -> int:
        return self.per_worker * max(1, self.workers)

    @cached_property
    def samples(self) -> Samples:
        """The split's compact index (group and speaker of each position, for the prediction rows)."""
        return split_samples(self.index, self.split)

    def pipeline(self) -> Any:
        import webdataset as wds

        return wds.DataPipeline(
            wds.SimpleShardList(self.shards.names),                                   # every shard, index order
            wds.filters.pipelinefilter(split_by_rank)(self.rank, self.world_size),    # node split: shard i -> i % R
            wds.split_by_worker,                                                      # worker split within the rank
            wds.filters.pipelinefilter(read_shards)(self.shards),                     # tar -> samples + split positions
            wds.map(StreamDecode(self.decoder, 0)),                                   # centre crops (eval decoder)
            wds.filters.pipelinefilter(padded_batches)(                               # equal batches, padding flagged
                self.cfg.eval_batch_size, self.per_worker, self.collate, FirstSample(self.shards, self.decoder)),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(self.pipeline(), batch_size=None, num_workers=self.workers,
                            **dataloader_settings(self.workers, self.cfg.loader_timeout_s))
        for batch in batches_of(loader, lambda: f"rank {self.rank}'s shards of {self.shards.where()}"):
            yield self._count(batch)
