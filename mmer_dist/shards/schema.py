"""The shard schema shared by the writer (`mmer-dist pack`) and every reader (loader, inspect).

A shards folder holds, per split, WebDataset tars and their index:

    {corpus}-{split}-{000000}.tar          one sample = KEY.json (+ KEY.txt, KEY.flac, KEY.mp4)
    {corpus}-{split}-{000000}.stats.json   written last, after the tar is renamed into place:
                                           marks the shard complete (resume skips it)
    index.json                             merged from the stats files at the end of a pack
    pack.json                              the packing arguments (a different config is refused)
    plan.json                              which sample goes in which shard, with its digest: written
                                           once by the first task; every task and the merge check it
    skipped.json                           inputs skipped or degraded, by reason, with names

Members of one sample (a modality the utterance lacks is absent, never empty):

    KEY.json   metadata: corpus, split, label, label_id, labels (the label set), speaker,
               duration, source, profile, modalities, plus `meta`: the corpus fields (dialogue/utterance
               ids and the previous turns as `context` for MELD, RAVDESS codes); raw profile with audio
               inside the video file: "audio_member": "mp4"
    KEY.txt    transcript, UTF-8
    KEY.flac   audio: mono 16 kHz FLAC (profile train) / KEY.wav etc. original bytes (profile raw)
    KEY.mp4    video: re-encoded to the training profile, or the original bytes (profile raw)

Per-shard stats (`ShardStats`) record every sample's key, label id and the byte offset and
size of each member inside the tar, so the map-style loader can seek straight to a sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

INDEX_FILE = "index.json"
PACK_FILE = "pack.json"
PLAN_FILE = "plan.json"
SKIPPED_FILE = "skipped.json"

META_EXT = "json"
TEXT_EXT = "txt"
AUDIO_EXTS = ("flac", "wav", "mp3", "m4a", "ogg")   # train profile writes flac; raw keeps the source's
VIDEO_EXTS = ("mp4", "avi", "mkv", "webm")
EMBED_EXT_PREFIX = "emb."                            # embedding shards: KEY.emb.text.npy, ...


def shard_name(corpus: str, split: str, index: int) -> str:
    return f"{corpus}-{split}-{index:06d}.tar"


def stats_name(shard: str) -> str:
    """`meld-train-000003.tar` -> `meld-train-000003.stats.json`."""
    return shard[: -len(".tar")] + ".stats.json"


@dataclass
class SampleEntry:
    """Where one sample lives inside its tar."""

    key: str
    label_id: int
    members: dict[str, list[int]]      # extension -> [byte offset of the data, size in bytes]
    duration: float = 0.0              # seconds of audio (0 when absent)


@dataclass
class ShardStats:
    """Written as `{shard}.stats.json` after the tar is complete; the shard's part of the index."""

    shard: str
    split: str
    samples: list[SampleEntry]
    bytes: int
    class_counts: dict[str, int]
    modalities: dict[str, int]         # modality -> number of samples that have it
    duration: float
    skipped: list[dict[str, Any]] = field(default_factory=list)   # inputs dropped/degraded while packing:
                                       # {key, reason, path, modalities, dropped, detail}
    sha256: str = ""                   # of the tar's bytes, computed while writing it ("" = packed before
                                       # checksums were recorded, or no tar); `mmer-dist verify` checks it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardStats":
        data = dict(data)
        data["samples"] = [SampleEntry(**s) for s in data["samples"]]
        return cls(**data)


@dataclass
class SplitIndex:
    """All shards of one split, in order; what a loader and the sampler need."""

    shards: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)          # samples per shard, same order
    keys: list[str] = field(default_factory=list)           # every sample, in shard order
    labels: list[int] = field(default_factory=list)         # label id of every sample, same order
    class_counts: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0
    bytes: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def add_shard(self, name: str, stats: "ShardStats") -> None:
        """Append a complete shard's stats (merging the per-shard files into the index)."""
        self.shards.append(name)
        self.sizes.append(len(stats.samples))
        self.keys.extend(e.key for e in stats.samples)
        self.labels.extend(e.label_id for e in stats.samples)
        for k, n in stats.class_counts.items():
            self.class_counts[k] = self.class_counts.get(k, 0) + n
        for k, n in stats.modalities.items():
            self.modalities[k] = self.modalities.get(k, 0) + n
        self.duration = round(self.duration + stats.duration, 6)
        self.bytes += stats.bytes


@dataclass
class ShardIndex:
    """`index.json`: the label set and every split of a shards folder."""

    corpus: str
    profile: str
    labels: list[str]
    splits: dict[str, SplitIndex]
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)    # e.g. the encoder that made embedding shards

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardIndex":
        data = dict(data)
        data["splits"] = {k: SplitIndex(**v) for k, v in data["splits"].items()}
        return cls(**data)


def write_json_atomic(path: Path, data: Any, indent: int = 1) -> None:
    """Write JSON so that readers never see a half-written file (tmp + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_stats(shards_dir: str | Path, shard: str) -> ShardStats:
    """The `{shard}.stats.json` of shard `shard` in `shards_dir`."""
    with open(Path(shards_dir) / stats_name(shard), encoding="utf-8") as f:
        return ShardStats.from_json(json.load(f))


def load_index(shards_dir: str | Path) -> ShardIndex:
    """Read `index.json` of a shards folder, with an error that says how to make one."""
    path = Path(shards_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {shards_dir} is not a finished shards folder. "
            f"Create one with `mmer-dist pack {{meld,ravdess}} --root RAW --out {shards_dir}` "
            f"(an interrupted pack resumes when run again with the same arguments)."
        )
    with open(path, encoding="utf-8") as f:
        return ShardIndex.from_json(json.load(f))


def split_index(index: ShardIndex, split: str, shards_dir: str | Path = "") -> SplitIndex:
    """One split of an index, with an error that lists the splits present."""
    if split not in index.splits:
        raise KeyError(f"split {split!r} not in shards {shards_dir}; present: {', '.join(sorted(index.splits))}")
    return index.splits[split]
