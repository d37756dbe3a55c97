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
from mmer_dist.jsonio import DamagedFileError
from mmer_dist.presets import CONFIG_DIR, dump_config, load_config
from mmer_dist.shards.schema import load_index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmer-dist train",
        description="Train a multimodal emotion model on packed shards. The config is the defaults, "
                    "then the preset (--config), then dotted overrides (key=value).",
        epilog="examples:\n"
               "  mmer-dist train --config debug --shards shards/out/synth --out runs/debug\n"
               "  mmer-dist train --config debug sampler.weighting=inverse optim.lr=3e-4\n"
               "  mmer-dist train --config debug --out runs/debug resume=latest\n"
               "  mmer-dist train --config debug --out runs/debug resume=must train.epochs=6   (a longer run)\n"
               "  mmer-dist train --config meld_text_minilm --dump-config\n\n"
               f"presets: {', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))}\n"
               "config sections: name, data, sampler, model, loss, optim, train (every field is documented in "
               "mmer_dist/config.py; --dump-config shows the resolved values)\n\n"
               "resume=latest continues from the newest checkpoint (none yet: starts fresh); resume=must refuses\n"
               "when there is none. A resume keeps RUN/config.yaml: only the length (train.epochs, train.max_steps),\n"
               "the eval/log/checkpoint cadence, train.keep_checkpoints and train.dist_timeout_s may change; each\n"
               "start is recorded in RUN/resumes.jsonl. Ctrl-C (or SIGTERM) saves a checkpoint at the next step\n"
               "and exits; a second Ctrl-C aborts at once (exit 130).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="preset name (mmer_dist/configs/NAME.yaml) or a YAML path")
    p.add_argument("--shards", default=None, help="shards folder or URL: s3://, gs://, http(s)://, file://, "
                                                  "pipe:CMD with {shard} (same as data.shards=...)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset name>)")
    p.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=3e-4 data.modalities=[text] resume=latest|must")
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
        return _start(args)
    except KeyboardInterrupt:      # Ctrl-C while starting, before train() installs its stop handler
        print("mmer-dist train: interrupted while starting; this start trained no step", file=sys.stderr)
        return 130


def _start(args: argparse.Namespace) -> int:
    """Resolve and check the config (every check before any process group starts), then train."""
    try:
        cfg, run_dir = resolve(args)
        if args.dump_config:
            print(dump_config(cfg), end="")
            return 0
        from mmer_dist.data.build import shards_location
        from mmer_dist.dist import world_info
        from mmer_dist.train.preflight import preflight, resolve_for_shards, resolve_for_world

        index = load_index(shards_location(cfg.data))           # once per rank; the loaders get it
        cfg = resolve_for_world(resolve_for_shards(cfg, index), world_info().world_size)
        preflight(cfg, run_dir, index)
    except (ValueError, OSError, KeyError) as e:     # ConfigError, a damaged file, FileNotFoundError, an unreadable URL
        return _user_error(e)
    from mmer_dist.data.loader import DataError
    from mmer_dist.lifecycle import RunLock, RunLockedError, die_with_parent, launched_by_torchrun
    from mmer_dist.train.loop import train
    from mmer_dist.train.stop import handlers_restored

    if launched_by_torchrun():
        die_with_parent()                  # a rank never outlives its launcher (mmer_dist.lifecycle)
    try:
        lock = RunLock(run_dir) if world_info().rank == 0 else None    # one owner per run folder
    except RunLockedError as e:
        return _user_error(e)
    try:
        with handlers_restored():          # train() installs the stop handlers (Ctrl-C, SIGTERM)
            result = train(cfg, run_dir, index)
    except DamagedFileError as e:          # e.g. a shard's stats file, read when the loaders start
        return _user_error(e)
    except DataError as e:                 # damaged shards, too many undecodable samples: named, no traceback
        print(f"mmer-dist train: {e}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 1 if not result or result.get("stalled") else 0


def _user_error(e: Exception) -> int:
    print(f"mmer-dist train: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
