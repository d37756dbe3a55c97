"""`python -m mmer_dist.train` / `mmer-dist train`: parse the config, check it, train, close.

    python -m mmer_dist.train --config debug --shards shards/out/synth --out runs/debug optim.lr=1e-3
    accelerate launch --config_file launch/cpu_2proc.yaml -m mmer_dist.train --config debug ...
    torchrun --nproc_per_node 8 -m mmer_dist.train --config meld_base --out runs/meld resume=latest

Everything that can be checked is checked here, before any process group starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from mmer_dist.config import CONFIG_DIR, Config, ConfigError, dump_config, load_config
from mmer_dist.dist import world_info
from mmer_dist.train.checkpoint import complete_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmer-dist train",
        description="Train a multimodal emotion model on packed shards. The config is the defaults, "
                    "then the preset (--config), then dotted overrides (key=value).",
        epilog="examples:\n"
               "  mmer-dist train --config debug --shards shards/out/synth --out runs/debug\n"
               "  mmer-dist train --config debug sampler.weighting=inverse optim.lr=3e-4\n"
               "  mmer-dist train --config debug --out runs/debug resume=latest\n"
               "  mmer-dist train --config meld_text_minilm --dump-config\n\n"
               f"presets: {', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))}\n"
               "config sections: name, data, sampler, model, loss, optim, train (every field is documented in "
               "mmer_dist/config.py; --dump-config shows the resolved values)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="preset name (mmer_dist/configs/NAME.yaml) or a YAML path")
    p.add_argument("--shards", default=None, help="shards folder (same as data.shards=...)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset name>)")
    p.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=3e-4 data.modalities=[text] resume=latest")
    return p


def resolve(args: argparse.Namespace) -> tuple[Config, Path]:
    overrides = ["train.resume=" + o.split("=", 1)[1] if o.startswith("resume=") else o for o in args.overrides]
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.out or f"runs/{cfg.name}")
    return cfg, run_dir


def preflight(cfg: Config, run_dir: Path) -> None:
    """Fail before any process group starts, with a message that names the fix."""
    from mmer_dist.shards.schema import load_index, split_index

    index = load_index(cfg.data.shards)
    train = split_index(index, cfg.data.train_split, cfg.data.shards)
    split_index(index, cfg.data.eval_split, cfg.data.shards)         # a missing eval split fails before any process starts
    from mmer_dist.models.cached import check_embeddings

    # model.<m>.kind=cached needs embeddings of the encoder it names; hf/scratch encoders need media
    check_embeddings(index.extra, cfg.model, cfg.data.modalities, cfg.data.shards)
    present = train.modalities
    if not any(present.get(m, 0) for m in cfg.data.modalities):
        raise ConfigError(f"data.modalities={list(cfg.data.modalities)} but the shards in {cfg.data.shards} hold "
                          f"{ {k: v for k, v in present.items() if v} }; choose modalities the shards have")
    world = world_info().world_size
    if cfg.data.loader == "stream":
        from mmer_dist.data.stream import StreamPlan

        try:
            StreamPlan(train.sizes, cfg.data.batch_size, world, cfg.data.num_workers, cfg.data.stream_resample,
                       cfg.data.steps_per_epoch, where=f"{cfg.data.shards} split {cfg.data.train_split}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        batches = (cfg.data.steps_per_epoch or math.ceil(train.num_samples / world) // cfg.data.batch_size)
        if batches < cfg.train.grad_accum:
            raise ConfigError(
                f"split {cfg.data.train_split!r} has {train.num_samples} samples: with {world} process(es) x "
                f"data.batch_size={cfg.data.batch_size} that is {batches} batch(es) per rank per epoch, fewer than "
                f"train.grad_accum={cfg.train.grad_accum}; lower data.batch_size or train.grad_accum")
        total = cfg.train.max_steps or cfg.train.epochs * (batches // cfg.train.grad_accum)
        if cfg.optim.warmup_steps >= total:
            raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} >= the run's {total} optimizer steps; "
                              f"lower optim.warmup_steps (or train longer)")
    uses_ds = bool(cfg.train.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    unfreezing = [m for m in cfg.data.modalities if getattr(cfg.model, m).unfreeze_after_steps > 0]
    if uses_ds and unfreezing:
        raise ConfigError(f"model.{unfreezing[0]}.unfreeze_after_steps needs new parameters in the optimizer mid-run, "
                          f"which DeepSpeed cannot do; with DeepSpeed keep encoders frozen (unfreeze_after_steps=0) "
                          f"or trainable from the start (freeze=false)")
    if cfg.train.deepspeed and not Path(cfg.train.deepspeed).is_file():
        raise ConfigError(f"train.deepspeed={cfg.train.deepspeed}: no such file (see launch/ds_zero2.json)")
    if cfg.train.deepspeed:
        from mmer_dist.train.ema import check_zero_stage

        try:
            ds = json.loads(Path(cfg.train.deepspeed).read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"train.deepspeed={cfg.train.deepspeed} is not valid JSON ({e}); start from "
                              f"launch/ds_zero2.json") from None
        check_zero_stage(cfg.train.ema_decay, ds.get("zero_optimization", {}).get("stage"))
    if not cfg.train.resume and complete_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints of a run; pass resume=latest to continue it, "
                          f"or choose a new --out")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, run_dir = resolve(args)
        if args.dump_config:
            print(dump_config(cfg), end="")
            return 0
        preflight(cfg, run_dir)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        print(f"mmer-dist train: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    from mmer_dist.train.loop import train

    result = train(cfg, run_dir)
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
