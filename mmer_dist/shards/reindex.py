"""`mmer-dist reindex DIR`: rebuild index.json and the compact index of a shards folder from its stats files.

    mmer-dist reindex shards/out/meld        # upgrade a folder written by an older mmer_dist, in place

Folders of index format 1 kept every sample's key and label in index.json and no speakers or groups;
readers of format 2 need the columns of `samples/{split}/`. This command:

1. walks the shards of every split in index order; a stats file whose samples lack the speaker
   (format 1) is completed from each sample's KEY.json (one read at its recorded offset) and
   rewritten atomically, so an interrupted upgrade resumes where it stopped;
2. merges the stats into the compact index and index.json (written last), keeping the folder's
   corpus, profile and records (pack hash, embedding records); no tar is rewritten.

Also the way to rebuild a damaged index.json or compact index after the stats files are intact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist reindex",
                                description="Rebuild index.json and the compact per-sample index of a shards folder "
                                            "from its stats files, in place (upgrades folders of older versions; "
                                            "resumable; never rewrites a tar).")
    p.add_argument("shards", help="shards folder written by `mmer-dist pack` or `mmer-dist embed`")
    return p


def _sample_meta(tar: Path, sample: dict[str, Any]) -> dict[str, Any]:
    """The KEY.json member of one sample, read at its recorded offset."""
    offset, size = sample["members"]["json"]
    with open(tar, "rb") as f:
        f.seek(offset)
        return json.loads(f.read(size))


def upgrade_stats(root: Path, name: str) -> bool:
    """Complete one shard's stats with speaker and group from its samples' KEY.json; True when rewritten."""
    from mmer_dist.corpora.record import group_of
    from mmer_dist.shards.schema import stats_name, write_json_atomic

    path = root / stats_name(name)
    data = json.loads(path.read_text(encoding="utf-8"))
    if all("speaker" in s for s in data["samples"]):
        return False
    for s in data["samples"]:
        meta = _sample_meta(root / name, s)
        s["speaker"], s["group"] = str(meta.get("speaker", "")), group_of(meta.get("corpus", ""), meta.get("meta", {}))
    write_json_atomic(path, data)
    return True


def reindex(shards_dir: str | Path, progress: bool = True) -> Any:
    """Upgrade the stats of `shards_dir` where needed and write its index (see the module docstring)."""
    from tqdm.auto import tqdm

    from mmer_dist.corpora.record import GROUP_UNITS
    from mmer_dist.shards.merge import merge_stats, write_index
    from mmer_dist.shards.schema import INDEX_FILE

    root = Path(shards_dir)
    path = root / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: an unfinished pack has no index to rebuild; run the same "
                                f"`mmer-dist pack` command again to finish and merge it")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it lists the shards, so it cannot be rebuilt without "
                         f"it: run the same `mmer-dist pack` command with --merge-only") from None
    plan = [(split, name) for split, si in old["splits"].items() for name in si["shards"]]
    rewritten = sum(upgrade_stats(root, name) for _, name in tqdm(plan, desc="reindex", unit="shard",
                                                                   disable=not progress))
    merged = merge_stats(root, plan, list(old["labels"]), list(old["splits"]))
    corpus = old.get("corpus", "")
    index = merged.index(corpus, old.get("profile", ""), old.get("group_unit", GROUP_UNITS.get(corpus, "utterance")),
                         old.get("extra", {}))
    write_index(root, index, merged.samples)
    return index, rewritten


def main(argv: list[str] | None = None) -> int:
    from mmer_dist.shards.merge import split_lines

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        index, rewritten = reindex(args.shards)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        print(f"mmer-dist reindex: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"{args.shards}: index format {index.schema_version}, {rewritten} stats file(s) upgraded "
          f"({os.path.getsize(Path(args.shards) / 'index.json') / 1e3:.1f} kB index.json)")
    print("\n".join(split_lines(index)))
    return 0
