"""Checks of a training run that need no process group: they fail in seconds, with the fix named.

    cfg = resolve_for_shards(cfg, index)          # the model sized to the shards' label set
    preflight(cfg, run_dir, index)                # ConfigError / FileNotFoundError / KeyError otherwise
                                                  # (a resume that changes the run's config, too)

Run by `python -m mmer_dist.train` on every rank before `train()` starts the process group, so a
bad config never leaves N processes waiting on each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mmer_dist.config import Config, ConfigError, replace
from mmer_dist.shards.schema import ShardIndex, SplitIndex, size_mismatches, split_index


def resolve_for_shards(cfg: Config, index: ShardIndex) -> Config:
    """The config a run trains with: the model predicts the shards' label set from the data's modalities
    at the data's sample rate (what config.yaml and the exported model record)."""
    model = replace(cfg.model, num_classes=len(index.labels), modalities=tuple(cfg.data.modalities),
                    sample_rate=cfg.data.sample_rate)
    return replace(cfg, model=model)


def resolve_for_world(cfg: Config, world: int) -> Config:
    """With data.global_batch_size=G: the per-rank micro-batch (<= data.batch_size) and train.grad_accum that make
    G samples per optimizer step on `world` processes (the fewest accumulation steps that divide evenly)."""
    g = cfg.data.global_batch_size
    if not g:
        return cfg
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"data.global_batch_size={g} derives train.grad_accum from the number of processes; "
                          f"leave train.grad_accum at 1 (it is {cfg.train.grad_accum}), or set data.global_batch_size=0")
    if g % world:
        raise ConfigError(f"data.global_batch_size={g} does not divide over {world} process(es); use a multiple of "
                          f"{world} (e.g. {max(world, g // world * world) if g >= world else world}) or another number "
                          f"of processes")
    per_rank = g // world
    accum = -(-per_rank // cfg.data.batch_size)
    while per_rank % accum:
        accum += 1
    return replace(cfg, data=replace(cfg.data, batch_size=per_rank // accum),
                   train=replace(cfg.train, grad_accum=accum))


def preflight(cfg: Config, run_dir: Path, index: ShardIndex) -> None:
    """Fail before any process group starts, with a message that names the fix."""
    from mmer_dist.models.cached import check_embeddings

    from mmer_dist.data.build import shards_location
    from mmer_dist.data.shard_reader import map_refusal
    from mmer_dist.dist import world_info

    location = shards_location(cfg.data)
    if not location.is_local and cfg.data.loader == "map":
        raise ConfigError(map_refusal(location))
    packed = _check_splits(cfg, index)
    train = split_index(index, packed[0], cfg.data.shards)
    # a URL: one HEAD request per shard, asked by the first process only (not by every rank of a large job)
    check = location.is_local or world_info().rank == 0
    damaged = size_mismatches(location, index, sorted(set(packed))) if check else []
    if damaged:
        raise ConfigError(f"{len(damaged)} shard(s) differ from the index: " + "; ".join(damaged[:5])
                          + f". They changed after packing (truncated, replaced or deleted). `mmer-dist verify "
                            f"{cfg.data.shards}` checks every shard and prints the command that re-packs the damaged ones")
    # model.<m>.kind=cached needs embeddings of the encoder it names; hf/scratch encoders need media
    check_embeddings(index.extra, cfg.model, cfg.data.modalities, cfg.data.shards)
    present = train.modalities
    if not any(present.get(m, 0) for m in cfg.data.modalities):
        raise ConfigError(f"data.modalities={list(cfg.data.modalities)} but the shards in {cfg.data.shards} hold "
                          f"{ {k: v for k, v in present.items() if v} }; choose modalities the shards have")
    _check_epoch(cfg, train, _train_samples(cfg, index, train))
    _check_deepspeed(cfg)
    from mmer_dist.train.checkpoint import complete_checkpoints
    from mmer_dist.train.resume import plan_resume

    if not cfg.train.resume and complete_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints of a run; pass resume=latest to continue it, "
                          f"or choose a new --out")
    plan_resume(cfg, run_dir)     # a resume may not change the run's config (model, data, ...): refused here


def _check_splits(cfg: Config, index: ShardIndex) -> tuple[str, str]:
    """The packed splits the train and eval splits are read from (a missing split or a bad fold fails here)."""
    from mmer_dist.data.folds import fold_rows, protocol
    from mmer_dist.folds import FoldError

    if cfg.data.folds and cfg.data.loader == "stream":
        raise ConfigError("data.folds needs data.loader=map: a fold reads the samples of some speakers, a stream "
                          "reads whole shards")
    try:
        packed = (fold_rows(index, cfg.data.shards, cfg.data, cfg.data.train_split)[0],
                  fold_rows(index, cfg.data.shards, cfg.data, cfg.data.eval_split)[0])
        split_index(index, packed[0], cfg.data.shards)
        split_index(index, packed[1], cfg.data.shards)     # a missing eval split fails before any process
        if cfg.data.folds:
            protocol(index, cfg.data.shards, cfg.data, ["train", "dev", "test"])   # refuses a speaker in two splits
    except FoldError as e:
        raise ConfigError(str(e)) from None
    return packed


def _train_samples(cfg: Config, index: ShardIndex, train: SplitIndex) -> int:
    if not cfg.data.folds:
        return train.num_samples
    from mmer_dist.data.folds import fold_rows

    return int(fold_rows(index, cfg.data.shards, cfg.data, cfg.data.train_split)[1].size)


def _check_epoch(cfg: Config, train: SplitIndex, num_samples: int) -> None:
    """Enough batches per rank for the loader, the accumulation and the warmup."""
    from mmer_dist.dist import world_info

    world = world_info().world_size
    if cfg.data.loader == "stream":
        from mmer_dist.data.stream_loader import StreamPlan

        try:
            StreamPlan(train.sizes, cfg.data.batch_size, world, cfg.data.num_workers, cfg.data.stream_resample,
                       cfg.data.steps_per_epoch, where=f"{cfg.data.shards} split {cfg.data.train_split}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return
    batches = (cfg.data.steps_per_epoch or math.ceil(num_samples / world) // cfg.data.batch_size)
    if batches < cfg.train.grad_accum:
        raise ConfigError(
            f"split {cfg.data.train_split!r} has {num_samples} samples: with {world} process(es) x "
            f"data.batch_size={cfg.data.batch_size} that is {batches} batch(es) per rank per epoch, fewer than "
            f"train.grad_accum={cfg.train.grad_accum}; lower data.batch_size or train.grad_accum")
    total = cfg.train.max_steps or cfg.train.epochs * (batches // cfg.train.grad_accum)
    if cfg.optim.warmup_steps >= total:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} >= the run's {total} optimizer steps; "
                          f"lower optim.warmup_steps (or train longer)")


def _check_deepspeed(cfg: Config) -> None:
    """The DeepSpeed JSON (train.deepspeed or $MMER_DEEPSPEED_CONFIG) exists, parses and fits the config."""
    from mmer_dist.train.ema import check_zero_stage
    from mmer_dist.train.engine import deepspeed_config_path, uses_deepspeed

    unfreezing = [m for m in cfg.data.modalities if getattr(cfg.model, m).unfreeze_after_steps > 0]
    if uses_deepspeed(cfg) and unfreezing:
        raise ConfigError(f"model.{unfreezing[0]}.unfreeze_after_steps needs new parameters in the optimizer mid-run, "
                          f"which DeepSpeed cannot do; with DeepSpeed keep encoders frozen (unfreeze_after_steps=0) "
                          f"or trainable from the start (freeze=false)")
    path = deepspeed_config_path(cfg)
    if not path:
        return
    where = f"train.deepspeed={path}" if cfg.train.deepspeed else f"MMER_DEEPSPEED_CONFIG={path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: no such file (see launch/ds_zero2.json)")
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{where} is not valid JSON ({e}); start from launch/ds_zero2.json") from None
    check_zero_stage(cfg.train.ema_decay, ds.get("zero_optimization", {}).get("stage"))
