"""Build the rank loaders of a run: `data.loader` and where the shards live pick the implementation.

    location = shards_location(cfg.data)                                  # folder, URL or pipe: (shards.location)
    index = load_index(location)                                          # read once, by the caller
    train = build_train_loader(cfg.data.shards, cfg.data, cfg.sampler, tokenizer, rank=r, world_size=R,
                               seed=s, index=index)
    dev = build_eval_loader(cfg.data.shards, cfg.data, tokenizer, split="dev", rank=r, world_size=R, index=index)

Both return rank loaders (mmer_dist.data.loader): already split by rank, NEVER for
`accelerator.prepare`. Training: `data.loader=map` (random access, local folders only) or `stream`.
Evaluation streams (mmer_dist.data.stream_eval) with `data.loader=stream` and for every URL, and
reads by byte range (the map-style `EvalBatches`) otherwise: each sample exactly once either way.

Why the map-style loader refuses URLs instead of filling a local copy first: it reads one byte
range per sample at random (~300 samples/s per GPU: ~150k requests/s on 512 GPUs, far beyond
what one bucket prefix serves), and a copy of the whole corpus on every node is exactly what
`aws s3 sync` / `rclone copy` to a cluster filesystem already does, resumably and once per cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmer_dist.config import DataConfig, SamplerConfig
from mmer_dist.data.collate import Collator
from mmer_dist.data.decode import Decoder
from mmer_dist.data.folds import fold_rows
from mmer_dist.data.map_loader import MapEvalLoader, MapTrainLoader, build_map_eval_loader, build_map_train_loader
from mmer_dist.data.shard_reader import ShardDataset
from mmer_dist.data.shard_stream import SplitShards
from mmer_dist.data.stream_eval import StreamEvalLoader
from mmer_dist.data.stream_loader import StreamLoader
from mmer_dist.shards.location import Location, RetryPolicy
from mmer_dist.shards.schema import ShardIndex, load_index


def shards_location(cfg_data: DataConfig, shards: str | Path | None = None) -> Location:
    """Where `shards` (default data.shards) live, with the configured cache folder, retries and timeout."""
    policy = RetryPolicy(attempts=cfg_data.read_retries, timeout_s=cfg_data.read_timeout_s)
    return Location(cfg_data.shards if shards is None else shards, cfg_data.cache_dir, policy)


def build_decoder(cfg_data: DataConfig, tokenizer: Any, train: bool, seed: int = 0) -> Decoder:
    """The decode step of the workers: random crops seeded by `seed` in training, centre crops otherwise."""
    return Decoder(cfg_data, tokenizer if "text" in cfg_data.modalities else None, train=train, seed=seed)


def _map_dataset(location: Location, index: ShardIndex, cfg_data: DataConfig, split: str,
                 decoder: Decoder) -> ShardDataset:
    packed, rows = fold_rows(index, location, cfg_data, split)
    return ShardDataset(location, packed, cfg_data, decoder, index=index, rows=rows)   # refuses a URL


def build_train_loader(shards_dir: str | Path, cfg_data: DataConfig, cfg_sampler: SamplerConfig, tokenizer: Any,
                       rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int | None = None,
                       split: str | None = None, index: ShardIndex | None = None) -> MapTrainLoader | StreamLoader:
    """The per-rank train loader (`cfg_data.loader`: map or stream), positioned at `epoch`.

    `seed` (default `cfg_sampler.seed`) seeds the draw and the crops; `index` is the shards' index if
    the caller has read it already. NEVER pass the result through `accelerator.prepare`: it is already
    split by rank and Accelerate would shard it again (each rank would train on 1/world of its share).
    """
    split = split or cfg_data.train_split
    seed = cfg_sampler.seed if seed is None else int(seed)
    location = shards_location(cfg_data, shards_dir)
    index = load_index(location) if index is None else index
    decoder = build_decoder(cfg_data, tokenizer, train=True, seed=seed)
    collate = Collator.for_tokenizer(cfg_data, tokenizer)
    if cfg_data.loader == "stream":
        shards = SplitShards.of(location, index, split)
        sidx = index.splits[split]
        loader: MapTrainLoader | StreamLoader = StreamLoader(
            shards, [sidx.class_counts.get(n, 0) for n in index.labels], list(index.labels), cfg_data, cfg_sampler,
            decoder, collate, rank, world_size, seed, where=f"{location} split {split}")
    else:
        dataset = _map_dataset(location, index, cfg_data, split, decoder)
        loader = build_map_train_loader(dataset, cfg_data, cfg_sampler, rank, world_size, seed, collate)
    loader.set_epoch(epoch)
    return loader


def build_eval_loader(shards_dir: str | Path, cfg_data: DataConfig, tokenizer: Any, split: str | None = None,
                      rank: int = 0, world_size: int = 1,
                      index: ShardIndex | None = None) -> MapEvalLoader | StreamEvalLoader:
    """Per-rank eval loader of `split` (default `cfg_data.eval_split`): centre crops, no shuffle, each sample
    exactly once over all ranks, padding repeats flagged in `batch["pad"]`; streamed for a URL or data.loader=stream."""
    split = split or cfg_data.eval_split
    location = shards_location(cfg_data, shards_dir)
    index = load_index(location) if index is None else index
    decoder = build_decoder(cfg_data, tokenizer, train=False)
    collate = Collator.for_tokenizer(cfg_data, tokenizer)
    if (cfg_data.loader == "stream" or not location.is_local) and not cfg_data.folds:
        return StreamEvalLoader(SplitShards.of(location, index, split), index, split, cfg_data, decoder, collate,
                                rank, world_size)
    dataset = _map_dataset(location, index, cfg_data, split, decoder)
    return build_map_eval_loader(dataset, cfg_data, rank, world_size, collate)
