"""What pack and embed share after the shards are written: merging the stats, comparing run records.

    merged = merge_stats(out, [("train", "meld-train-000000.tar"), ...], labels)
    index = ShardIndex(corpus, profile, labels, merged.splits, extra={...})
    write_json_atomic(out / INDEX_FILE, index.to_json())
    print("\\n".join(split_lines(index)))
    lines = record_diff(old_record, new_record)     # the keys that differ, for a refusal message

A shard counts for the index once its stats file exists (mmer_dist.shards.writer); the stats carry
the inputs skipped while writing it, which the merge counts by reason (dropped or degraded) and lists.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmer_dist.shards.schema import ShardIndex, ShardStats, SplitIndex, read_stats


@dataclass
class MergedStats:
    """The per-split index of the merged shards and the inputs their writers skipped."""

    splits: dict[str, SplitIndex]
    dropped: Counter = field(default_factory=Counter)       # reason -> inputs left out
    degraded: Counter = field(default_factory=Counter)      # reason -> inputs kept without a modality
    files: dict[str, list[str]] = field(default_factory=dict)   # reason -> "path (key: modalities)" lines


def merge_stats(out: Path, shards: list[tuple[str, str]], labels: list[str], splits: list[str] | None = None,
                check: Callable[[str, ShardStats], None] | None = None) -> MergedStats:
    """Merge the stats of `shards` [(split, shard name)], in that order; `splits` are created even when empty.
    `check(name, stats)` sees every shard's stats as they are read (pack checks them against its plan)."""
    merged = MergedStats(splits={s: SplitIndex(class_counts={k: 0 for k in labels}) for s in splits or []})
    for split, name in shards:
        stats = read_stats(out, name)
        if check is not None:
            check(name, stats)
        for s in stats.skipped:
            (merged.dropped if s.get("dropped", True) else merged.degraded)[s["reason"]] += 1
            merged.files.setdefault(s["reason"], []).append(
                f"{s['path']} ({s['key']}: {'/'.join(s['modalities'])})")
        si = merged.splits.setdefault(split, SplitIndex(class_counts={k: 0 for k in labels}))
        if stats.samples:
            si.add_shard(name, stats)
    return merged


def split_lines(index: ShardIndex) -> list[str]:
    """One summary line per split of a merged index."""
    return [f"  {split}: {si.num_samples} samples in {len(si.shards)} shards, {si.bytes / 1e6:.1f} MB, "
            f"{si.duration / 3600:.2f} h, modalities {si.modalities}" for split, si in index.splits.items()]


def record_diff(old: dict[str, Any], new: dict[str, Any], show: Callable[[Any], str] = repr) -> list[str]:
    """`  key: existing X, now Y` (values shown by `show`) for every key that differs between two run records."""
    return [f"  {k}: existing {show(old.get(k))}, now {show(new.get(k))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
