"""What pack, embed and reindex share after the shards are written: merging the stats into the index.

    merged = merge_stats(out, [("train", "meld-train-000000.tar"), ...], labels)
    index = merged.index(corpus, profile, group_unit="dialogue", extra={...})
    write_index(out, index, merged.samples)         # samples/{split}/*.npy, then index.json last
    print("\\n".join(split_lines(index)))
    lines = record_diff(old_record, new_record)     # the keys that differ, for a refusal message

A shard counts for the index once its stats file exists (mmer_dist.shards.writer); the stats carry
the inputs skipped while writing it, which the merge counts by reason (dropped or degraded) and lists.
The merge reads every stats file once and writes the compact per-sample index (schema.SAMPLE_DTYPE);
index.json, written last, marks the folder complete.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmer_dist.shards.schema import (INDEX_FILE, SAMPLE_DTYPE, IndexFormatError, ShardIndex, ShardStats, SplitIndex,
                                     read_stats, write_json_atomic, write_samples)


@dataclass
class MergedStats:
    """The per-split summaries and compact indexes of the merged shards, and the inputs their writers skipped."""

    labels: list[str]
    splits: dict[str, SplitIndex]
    samples: dict[str, np.ndarray] = field(default_factory=dict)   # split -> SAMPLE_DTYPE records
    speakers: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)       # reason -> inputs left out
    degraded: Counter = field(default_factory=Counter)      # reason -> inputs kept without a modality
    files: dict[str, list[str]] = field(default_factory=dict)   # reason -> "path (key: modalities)" lines

    def index(self, corpus: str, profile: str, group_unit: str, extra: dict[str, Any]) -> ShardIndex:
        return ShardIndex(corpus=corpus, profile=profile, labels=self.labels, splits=self.splits, extra=extra,
                          speakers=self.speakers, group_unit=group_unit)


def merge_stats(out: Path, shards: list[tuple[str, str]], labels: list[str],
                splits: list[str] | None = None) -> MergedStats:
    """Merge the stats of `shards` [(split, shard name)], in that order; `splits` are created even when empty."""
    merged = MergedStats(labels=list(labels),
                         splits={s: SplitIndex(class_counts={k: 0 for k in labels}) for s in splits or []})
    speaker_ids: dict[str, int] = {}
    chunks: dict[str, list[np.ndarray]] = {s: [] for s in merged.splits}
    for split, name in shards:
        stats = read_stats(out, name)
        for s in stats.skipped:
            (merged.dropped if s.get("dropped", True) else merged.degraded)[s["reason"]] += 1
            merged.files.setdefault(s["reason"], []).append(
                f"{s['path']} ({s['key']}: {'/'.join(s['modalities'])})")
        si = merged.splits.setdefault(split, SplitIndex(class_counts={k: 0 for k in labels}))
        if stats.samples:
            chunks.setdefault(split, []).append(_records(stats, len(si.shards), speaker_ids, out))
            si.add_shard(name, stats, merged.labels)
    # speakers by name: their positions do not depend on the order the shards were merged in
    merged.speakers = sorted(speaker_ids)
    remap = np.full(len(speaker_ids) + 1, -1, dtype=np.int32)      # remap[-1] keeps "unknown" at -1
    for position, name in enumerate(merged.speakers):
        remap[speaker_ids[name]] = position
    for split, parts in chunks.items():
        arr = np.concatenate(parts) if parts else np.zeros(0, SAMPLE_DTYPE)
        arr["speaker"] = remap[arr["speaker"]]
        merged.samples[split] = arr
    for split in merged.splits:
        merged.samples.setdefault(split, np.zeros(0, SAMPLE_DTYPE))
    return merged


def _records(stats: ShardStats, shard_pos: int, speaker_ids: dict[str, int], out: Path) -> np.ndarray:
    """The compact records of one shard's samples (speakers as first-seen ids, -1 unknown)."""
    arr = np.zeros(len(stats.samples), dtype=SAMPLE_DTYPE)
    for i, e in enumerate(stats.samples):
        if e.speaker is None:
            raise IndexFormatError(f"{out}/{stats.shard}: its stats file predates the speaker field; upgrade the "
                                   f"folder with `mmer-dist reindex {out}`")
        offset, size = e.byte_range()
        speaker = speaker_ids.setdefault(e.speaker, len(speaker_ids)) if e.speaker else -1
        arr[i] = (shard_pos, offset, size, e.label_id, speaker, e.group, e.duration)
    return arr


def write_index(out: Path, index: ShardIndex, samples: dict[str, np.ndarray]) -> None:
    """The compact index of every split, then index.json, all atomically: index.json last marks it complete."""
    for split, arr in samples.items():
        write_samples(out, split, arr)
    write_json_atomic(Path(out) / INDEX_FILE, index.to_json())


def split_lines(index: ShardIndex) -> list[str]:
    """One summary line per split of a merged index."""
    return [f"  {split}: {si.num_samples} samples in {len(si.shards)} shards, {si.bytes / 1e6:.1f} MB, "
            f"{si.duration / 3600:.2f} h, modalities {si.modalities}" for split, si in index.splits.items()]


def record_diff(old: dict[str, Any], new: dict[str, Any], show: Callable[[Any], str] = repr) -> list[str]:
    """`  key: existing X, now Y` (values shown by `show`) for every key that differs between two run records."""
    return [f"  {k}: existing {show(old.get(k))}, now {show(new.get(k))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
