"""What pack, embed and reindex share after the shards are written: merging the stats into the index,
comparing run records; and the pack's own merge (`merge_pack`: every planned shard complete and holding
its planned keys).

    merged = merge_stats(out, [("train", "meld-train-000000.tar"), ...], labels)
    index = merged.index(corpus, profile, group_unit="dialogue", extra={...})
    write_index(out, index, merged.samples)         # samples/{split}/*.npy, then index.json last
    print("\\n".join(split_lines(index)))
    lines = record_diff(old_record, new_record)     # the keys that differ, for a refusal message
    index = merge_pack(out, plan, cfg, report)      # pack: index.json + skipped.json, checked against plan.json

A shard counts for the index once its stats file exists (mmer_dist.shards.writer); the stats carry
the inputs skipped while writing it, which the merge counts by reason (dropped or degraded) and lists.
The merge reads every stats file once and writes the compact per-sample index (schema.SAMPLE_DTYPE);
index.json, written last, marks the folder complete.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mmer_dist.shards.schema import (
    INDEX_FILE, PLAN_FILE, SAMPLE_DTYPE, SKIPPED_FILE, IndexFormatError, ShardIndex, ShardStats, SplitIndex,
    read_stats, write_json_atomic, write_samples,
)

if TYPE_CHECKING:                    # plan and writer import PyAV: only a pack needs them (embed --help stays fast)
    from mmer_dist.corpora.record import ReadReport
    from mmer_dist.shards.plan import PackConfig, Plan


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


def merge_stats(out: Path, shards: list[tuple[str, str]], labels: list[str], splits: list[str] | None = None,
                check: Callable[[str, ShardStats], None] | None = None) -> MergedStats:
    """Merge the stats of `shards` [(split, shard name)], in that order; `splits` are created even when empty.
    `check(name, stats)` sees every shard's stats as they are read (pack checks them against its plan)."""
    merged = MergedStats(labels=list(labels),
                         splits={s: SplitIndex(class_counts={k: 0 for k in labels}) for s in splits or []})
    speaker_ids: dict[str, int] = {}
    chunks: dict[str, list[np.ndarray]] = {s: [] for s in merged.splits}
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


def merge_pack(out: str | Path, plan: Plan, cfg: PackConfig, report: ReadReport) -> ShardIndex:
    """Check every planned shard's stats against the plan, merge them into index.json and skipped.json
    (atomically). PackError when a shard is incomplete or holds other keys than planned."""
    from mmer_dist.corpora.labels import labels_for
    from mmer_dist.corpora.record import GROUP_UNITS
    from mmer_dist.shards.plan import PackError, check_stats

    out = Path(out)
    require_complete(out, plan)
    labels = list(labels_for(cfg.corpus))
    planned = {s.name: s for s in plan.shards}
    wrong: list[str] = []
    merged = merge_stats(out, [(s.split, s.name) for s in plan.shards], labels,
                         check=lambda name, stats: wrong.append(check_stats(planned[name], stats)))
    wrong = [w for w in wrong if w]
    if wrong:
        raise PackError(
            f"{len(wrong)} shard(s) in {out} do not hold what {out / PLAN_FILE} planned:\n"
            + "\n".join(f"  - {m}" for m in wrong[:5])
            + "\nThey were written from another view of the corpus. Delete their .stats.json files and run the "
              "tasks that write them again (the pack redoes shards without stats).")
    index = merged.index(cfg.corpus, cfg.profile, GROUP_UNITS.get(cfg.corpus, "utterance"),
                         extra={"pack_hash": cfg.digest(), "sample_rate": cfg.sample_rate,
                                "video_size": cfg.video_size, "video_fps": cfg.video_fps})
    _write_skipped(out, report, merged)
    write_index(out, index, merged.samples)        # index.json last: the folder is complete
    return index


def _write_skipped(out: Path, report: ReadReport, merged: MergedStats) -> None:
    """skipped.json: the reader's report plus the media failures of every shard, by reason, with names."""
    rd = report.to_dict()
    dropped = Counter(rd["skipped"]) + merged.dropped
    degraded = Counter(rd["degraded"]) + merged.degraded
    write_json_atomic(out / SKIPPED_FILE, {
        "dropped": dict(sorted(dropped.items())), "degraded": dict(sorted(degraded.items())),
        "total_dropped": sum(dropped.values()), "total_degraded": sum(degraded.values()),
        "reader": rd,
        "media": {"dropped": dict(sorted(merged.dropped.items())), "degraded": dict(sorted(merged.degraded.items())),
                  "files": merged.files},
    })


def require_complete(out: Path, plan: Plan) -> None:
    """PackError naming the planned shards that have no stats yet (from one listing of `out`)."""
    from mmer_dist.shards.plan import PackError
    from mmer_dist.shards.writer import complete_shards, list_folder

    done = complete_shards(out, [s.name for s in plan.shards], list_folder(out))
    missing = [s for s in plan.shards if s.name not in done]
    if missing:
        raise PackError(
            f"{len(missing)} of {len(plan.shards)} planned shards in {out} are not complete yet (plan position: "
            f"name: {', '.join(f'{s.index}: {s.name}' for s in missing[:5])}); in a job array of T tasks, "
            f"position i is written by task i % T. Let the remaining tasks finish, or resubmit them (or run the "
            f"pack again with the same arguments), before --merge-only")
