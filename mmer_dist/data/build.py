"""Build the rank loaders of a run: `data.loader` picks the map-style or the streaming one.

    index = load_index(cfg.data.shards)                                  # read once, by the caller
    train = build_train_loader(cfg.data.shards, cfg.data, cfg.sampler, tokenizer, rank=r, world_size=R,
                               seed=s, index=index)
    dev = build_eval_loader(cfg.data.shards, cfg.data, tokenizer, split="dev", rank=r, world_size=R, index=index)

Both return rank loaders (mmer_dist.data.loader): already split by rank, NEVER for
`accelerator.prepare`. Evaluation uses the map-style loader (random access, each sample exactly once).
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
from mmer_dist.data.stream_loader import StreamLoader
from mmer_dist.shards.schema import ShardIndex, load_index, split_index


def build_decoder(cfg_data: DataConfig, tokenizer: Any, train: bool, seed: int = 0) -> Decoder:
    """The decode step of the workers: random crops seeded by `seed` in training, centre crops otherwise."""
    return Decoder(cfg_data, tokenizer if "text" in cfg_data.modalities else None, train=train, seed=seed)


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
    index = load_index(shards_dir) if index is None else index
    decoder = build_decoder(cfg_data, tokenizer, train=True, seed=seed)
    collate = Collator.for_tokenizer(cfg_data, tokenizer)
    if cfg_data.loader == "stream":
        sidx = split_index(index, split, shards_dir)
        root = Path(shards_dir)
        loader: MapTrainLoader | StreamLoader = StreamLoader(
            [str(root / s) for s in sidx.shards], sidx.sizes, [sidx.class_counts.get(n, 0) for n in index.labels],
            list(index.labels), cfg_data, cfg_sampler, decoder, collate, rank, world_size, seed,
            where=f"{root} split {split}")
    else:
        packed, rows = fold_rows(index, shards_dir, cfg_data, split)
        dataset = ShardDataset(shards_dir, packed, cfg_data, decoder, index=index, rows=rows)
        loader = build_map_train_loader(dataset, cfg_data, cfg_sampler, rank, world_size, seed, collate)
    loader.set_epoch(epoch)
    return loader


def build_eval_loader(shards_dir: str | Path, cfg_data: DataConfig, tokenizer: Any, split: str | None = None,
                      rank: int = 0, world_size: int = 1, index: ShardIndex | None = None) -> MapEvalLoader:
    """Per-rank eval loader of `split` (default `cfg_data.eval_split`): centre crops, no shuffle, each sample
    exactly once over all ranks, padding repeats flagged in `batch["pad"]`."""
    split = split or cfg_data.eval_split
    index = load_index(shards_dir) if index is None else index
    packed, rows = fold_rows(index, shards_dir, cfg_data, split)
    dataset = ShardDataset(shards_dir, packed, cfg_data, build_decoder(cfg_data, tokenizer, train=False),
                           index=index, rows=rows)
    return build_map_eval_loader(dataset, cfg_data, rank, world_size, Collator.for_tokenizer(cfg_data, tokenizer))
