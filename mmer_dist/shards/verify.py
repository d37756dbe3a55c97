"""`mmer-dist verify DIR`: every shard's size and sha256 against its stats; names the damaged ones.

    mmer-dist verify shards/out/meld                # read-only; exit 1 when any shard is damaged
    mmer-dist verify shards/out/meld --move-aside   # also move the damaged shards into DIR/damaged/

    from mmer_dist.shards.verify import verify_folder
    report = verify_folder("shards/out/meld")       # VerifyReport(checked, damaged, size_only)

A shard is damaged when its tar is missing, when its size or its sha256 differ from what its
`{shard}.stats.json` recorded while the tar was written (`mmer-dist pack` and `mmer-dist embed`
both record them), when its stats file is unreadable, or when index.json lists it without stats.
Shards packed before sha256s were recorded are checked by size only (and listed as such).

Repair (the choice made here): a pack or embed run resumes by redoing exactly the shards that
have no stats file, and the same arguments give the same bytes. So `--move-aside` moves each
damaged shard's tar and stats into DIR/damaged/ (kept for inspection; delete it afterwards), and
verify prints the command that then re-packs just those shards: for a pack folder it is rebuilt
from pack.json; for an embedding folder it is `mmer-dist embed` with the input named in
embed.json and the config you embedded with (embed.json records the resulting encoders, not the
preset name; another config is refused, so a wrong one cannot mix in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmer_dist.shards.schema import INDEX_FILE, PACK_FILE, ShardStats, stats_name

EMBED_FILE = "embed.json"          # mmer_dist.embed.EMBED_FILE (not imported: that module imports torch)
DAMAGED_DIR = "damaged"


@dataclass
class Damage:
    """One damaged shard: what is wrong, what the stats expected and what is on disk."""

    shard: str
    problem: str                   # "missing tar" | "size" | "sha256" | "no stats" | "unreadable stats"
    expected: str = ""
    found: str = ""

    def line(self) -> str:
        if self.expected or self.found:
            return f"{self.shard}: {self.problem} expected {self.expected}, found {self.found}"
        return f"{self.shard}: {self.problem}"


@dataclass
class VerifyReport:
    """What `verify_folder` found."""

    root: Path
    checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    size_only: list[str] = field(default_factory=list)   # shards without a recorded sha256


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_names(root: Path) -> list[str]:
    """Every shard the folder should hold: those with stats files, and those index.json lists."""
    names = {p.name[: -len(".stats.json")] + ".tar" for p in root.glob("*.stats.json")}
    if (root / INDEX_FILE).exists():
        index = json.loads((root / INDEX_FILE).read_text(encoding="utf-8"))
        names.update(s for split in index.get("splits", {}).values() for s in split.get("shards", []))
    return sorted(names)


def check_shard(root: Path, name: str) -> tuple[Damage | None, bool]:
    """(the damage of shard `name` or None, whether its sha256 was checked)."""
    try:
        stats = ShardStats.from_json(json.loads((root / stats_name(name)).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return Damage(name, "no stats"), False
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Damage(name, "unreadable stats", found=f"{type(e).__name__}: {e}"[:120]), False
    tar = root / name
    if not stats.samples:
        return None, True                      # every sample was skipped: no tar by design
    if not tar.exists():
        return Damage(name, "missing tar", f"{stats.bytes} bytes", "no file"), False
    size = tar.stat().st_size
    if size != stats.bytes:
        return Damage(name, "size", f"{stats.bytes} bytes", f"{size} bytes"), False
    if not stats.sha256:
        return None, False
    digest = file_sha256(tar)
    if digest != stats.sha256:
        return Damage(name, "sha256", stats.sha256, digest), True
    return None, True


def verify_folder(root: str | Path) -> VerifyReport:
    """Check every shard of a pack or embed output folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass a shards folder written by `mmer-dist pack` or "
                                f"`mmer-dist embed`")
    report = VerifyReport(root)
    names = shard_names(root)
    if not names:
        raise FileNotFoundError(f"{root} holds no *.stats.json and no {INDEX_FILE}: not a shards folder")
    for name in names:
        damage, hashed = check_shard(root, name)
        report.checked += 1
        if damage is not None:
            report.damaged.append(damage)
        elif not hashed:
            report.size_only.append(name)
    return report


def move_aside(root: Path, damaged: list[Damage]) -> Path:
    """Move the damaged shards' tars and stats into ROOT/damaged/ (the resume then redoes them)."""
    dest = root / DAMAGED_DIR
    dest.mkdir(exist_ok=True)
    for d in damaged:
        for p in (root / d.shard, root / stats_name(d.shard)):
            if p.exists():
                shutil.move(str(p), str(dest / p.name))
    return dest


def pack_command(root: Path, config: dict[str, Any]) -> str:
    """The `mmer-dist pack` command that made `root`, from pack.json's config (its resume redoes the
    shards without stats, byte for byte)."""
    argv = ["mmer-dist", "pack", config["corpus"], "--root", config["root"], "--out", str(root),
            "--profile", config["profile"], "--shard-samples", str(config["shard_samples"]),
            "--shard-bytes", str(config["shard_bytes"]), "--seed", str(config["seed"]),
            "--video-size", str(config["video_size"]), "--video-fps", str(config["video_fps"]),
            "--missing-media", config["missing_media"]]
    if config.get("splits"):
        argv += ["--splits", ",".join(config["splits"])]
    options = config.get("reader_options", {})
    for flag, key in (("--test-actors", "test_actors"), ("--dev-actors", "dev_actors"), ("--fold", "fold")):
        value = options.get(key)
        if value:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(argv)


def repair_command(root: Path) -> str:
    """The command(s) that re-pack just the shards `move_aside` moved away."""
    if (root / PACK_FILE).exists():
        config = json.loads((root / PACK_FILE).read_text(encoding="utf-8"))["config"]
        line = pack_command(root, config)
        if config.get("video_crf", 23) != 23:
            line += f"    # video_crf={config['video_crf']} has no flag: call mmer_dist.shards.pack.pack(..., video_crf=...)"
        return line
    if (root / EMBED_FILE).exists():
        record = json.loads((root / EMBED_FILE).read_text(encoding="utf-8"))
        return (shlex.join(["mmer-dist", "embed", "--config", "CONFIG", "--shards", record.get("input", "INPUT"),
                            "--out", str(root)])
                + "    # CONFIG [overrides]: the ones this folder was embedded with (see embed.json)")
    return f"(no {PACK_FILE} or {EMBED_FILE} in {root}: re-run the command that made it; it resumes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `verify` command's flags."""
    parser.add_argument("shards", help="shards folder written by `mmer-dist pack` or `mmer-dist embed`")
    parser.add_argument("--move-aside", action="store_true",
                        help="move the damaged shards' tar and stats files into DIR/damaged/ (ready to re-pack)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmer-dist verify",
        description="Check every shard's size and sha256 against the stats recorded when it was written; print the "
                    "damaged shards (expected vs found) and the command that re-packs just them. Read-only unless "
                    "--move-aside; exit 1 when anything is damaged.",
        epilog="repair: --move-aside moves the damaged shards' tar and stats into DIR/damaged/; the printed pack (or "
               "embed) command, rebuilt from pack.json (embed.json), then redoes exactly those shards, byte for byte "
               "(a resume redoes shards without stats).")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the damaged shards (expected vs found) and the repair; 1 when anything is damaged, 2 on bad input."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = verify_folder(args.shards)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmer-dist verify: {e}", file=sys.stderr)
        return 2
    root = report.root
    print(f"{root}: {report.checked} shards checked, {len(report.damaged)} damaged"
          + (f", {len(report.size_only)} by size only (packed without a sha256)" if report.size_only else ""))
    if not report.damaged:
        return 0
    for d in report.damaged:
        print(f"  DAMAGED {d.line()}")
    if args.move_aside:
        dest = move_aside(root, report.damaged)
        print(f"moved the damaged shards' tar and stats into {dest}; re-pack just those shards with:")
    else:
        print("to re-pack just those shards: run this verify again with --move-aside, then:")
    print(f"  {repair_command(root)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
