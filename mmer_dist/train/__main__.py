"""`python -m mmer_dist.train` / `mmer-dist train`: parse the config, check it, train, close.

    python -m mmer_dist.train --config debug --shards shards/out/synth --out runs/debug optim.lr=1e-3
    accelerate launch --config_file launch/cpu_2proc.yaml -m mmer_dist.train --config debug ...
    torchrun --nproc_per_node 8 -m mmer_dist.train --config meld_base --out runs/meld resume=latest

Everything that can be checked is checked (mmer_dist.train.preflight) before any process group starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmer_dist.config import Config
from mmer_dist.presets import CONFIG_DIR, dump_config, load_config


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
    p.add_argument("--shards", default=None, help="shards folder or URL: s3://, gs://, http(s)://, file://, "
                                                  "pipe:CMD with {shard} (same as data.shards=...)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset name>)")
    p.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=3e-4 data.modalities=[text] resume=latest")
    return p


def resolve(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config (defaults <- preset <- --shards <- overrides; `resume=` means `train.resume=`) and run folder."""
    overrides = ["train.resume=" + o.split("=", 1)[1] if o.startswith("resume=") else o for o in args.overrides]
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    cfg = load_config(args.config, overrides)
    return cfg, Path(args.out or f"runs/{cfg.name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, run_dir = resolve(args)
        if args.dump_config:
            print(dump_config(cfg), end="")
            return 0
        from mmer_dist.data.build import shards_location
        from mmer_dist.dist import world_info
        from mmer_dist.shards.schema import load_index
        from mmer_dist.train.preflight import preflight, resolve_for_shards, resolve_for_world

        index = load_index(shards_location(cfg.data))           # once per rank; the loaders get it
        cfg = resolve_for_world(resolve_for_shards(cfg, index), world_info().world_size)
        preflight(cfg, run_dir, index)
    except (ValueError, OSError, KeyError) as e:     # ConfigError, FileNotFoundError, an unreadable URL
        print(f"mmer-dist train: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    from mmer_dist.data.loader import DataError
    from mmer_dist.lifecycle import RunLock, RunLockedError, die_with_parent, launched_by_torchrun
    from mmer_dist.train.loop import train

    if launched_by_torchrun():
        die_with_parent()                  # a rank never outlives its launcher (mmer_dist.lifecycle)
    try:
        lock = RunLock(run_dir) if world_info().rank == 0 else None    # one owner per run folder
    except RunLockedError as e:
        print(f"mmer-dist train: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, run_dir, index)
    except DataError as e:                 # damaged shards, too many undecodable samples: named, no traceback
        print(f"mmer-dist train: {e}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 1 if not result or result.get("stalled") else 0


if __name__ == "__main__":
    sys.exit(main())
