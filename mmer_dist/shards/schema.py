"""The shard schema shared by the writer (`mmer-dist pack`) and every reader (loader, inspect).

A shards folder holds, per split, WebDataset tars and their index:

    {corpus}-{split}-{000000}.tar          one sample = KEY.json (+ KEY.txt, KEY.flac, KEY.mp4)
    {corpus}-{split}-{000000}.stats.json   written last, after the tar is renamed into place:
                                           marks the shard complete (resume skips it)
    index.json                             the summaries, merged from the stats files at the end of a
                                           pack: label set, speakers, per split the shards with their
                                           sample counts, bytes and class counts; human-readable
    samples/{split}/{field}.npy            the compact index of a split: one column per field of
                                           SAMPLE_DTYPE (shard, byte range, label, speaker, group,
                                           duration), one row per sample, memory-mapped by every reader
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

Per-shard stats (`ShardStats`) record every sample's key, label id, speaker, group and the byte
offset and size of each member inside the tar. The merge turns them into the split's compact index:
a sample's members are consecutive in its tar, so one byte range (the first member's header to the
last member's data) is all a reader needs: one read per sample, parsed in memory (`split_members`).
At 10M samples the columns take 300 MB on disk and nothing in memory until pages are touched (a rank
reads the 20 MB label column to plan its epoch); the page cache shares them between the ranks and
loader workers of a node.

A sample's `group` is its corpus's independent unit (`ShardIndex.group_unit`): the MELD dialogue id,
the RAVDESS actor, or -1 (each utterance its own unit); statistics resample whole groups.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mmer_dist.jsonio import damaged, read_json

import numpy as np

from mmer_dist.shards.location import Location, ShardMissing

SCHEMA_VERSION = 2
"""2: index.json holds summaries only, the per-sample fields live in `samples/{split}/`."""

SAMPLE_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i4"), ("label", "<i2"),
                         ("speaker", "<i4"), ("group", "<i4"), ("duration", "<f4")])
"""One sample of the compact index: shard (position in the split's shard list), the byte range of its
members in that tar (offset of the first member's header, size up to the end of the last member's data),
label id, speaker (position in `ShardIndex.speakers`, -1 unknown), group (see the module docstring),
audio seconds."""
TAR_BLOCK = 512

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
    speaker: str | None = None         # None: written by a version that did not record it (`mmer-dist reindex`)
    group: int = -1                    # the corpus's independent unit (module docstring)

    def byte_range(self) -> tuple[int, int]:
        """(offset, size) of the sample's members in its tar: first header to the end of the last data."""
        start = min(off for off, _ in self.members.values()) - TAR_BLOCK
        end = max(off + size for off, size in self.members.values())
        return start, end - start


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
    """The summary of one split: its shards in order with their sizes, bytes and class counts."""

    shards: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)          # samples per shard, same order
    shard_bytes: list[int] = field(default_factory=list)    # bytes of each tar (a size check needs no read)
    shard_classes: list[list[int]] = field(default_factory=list)   # per shard: samples per label id
    class_counts: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0
    bytes: int = 0

    @property
    def num_samples(self) -> int:
        return int(sum(self.sizes))

    def add_shard(self, name: str, stats: "ShardStats", labels: list[str]) -> None:
        """Append a complete shard's stats (merging the per-shard files into the index)."""
        self.shards.append(name)
        self.sizes.append(len(stats.samples))
        self.shard_bytes.append(stats.bytes)
        self.shard_classes.append([int(stats.class_counts.get(k, 0)) for k in labels])
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
    speakers: list[str] = field(default_factory=list)      # speaker names; the compact index holds positions
    group_unit: str = "utterance"                          # what a sample's group is: dialogue | speaker | utterance
    # set by load_index, never written: where the index was read from and the sha256 of its bytes (the key
    # of the node cache of its columns, so a changed index is never served stale)
    origin: Location | None = field(default=None, repr=False, compare=False)
    sha256: str = field(default="", repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(replace(self, origin=None))
        del data["origin"], data["sha256"]
        return data

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
    return ShardStats.from_json(read_json(Path(shards_dir) / stats_name(shard), fix=f"delete it and {shard}, then "
                                          f"re-run the same `mmer-dist pack` (or `embed`) command: that shard is written again"))


class IndexFormatError(ValueError):
    """A shards folder written by an older mmer_dist (or damaged): the message names the upgrade command."""


def load_index(shards: str | Path | Location) -> ShardIndex:
    """Read `index.json` of a shards folder or URL (the summaries; one read), with an error that says how to
    make or upgrade one. The index remembers its location and digest (`origin`, `sha256`) for `split_samples`."""
    loc = shards if isinstance(shards, Location) else Location(shards)
    where = loc.shown(INDEX_FILE)
    try:
        raw = loc.read_bytes(INDEX_FILE)
    except ShardMissing:
        upload = "" if loc.is_local else " and upload it whole, index.json last (README, \"Shards by URL\")"
        raise FileNotFoundError(
            f"{where} not found: {loc} is not a finished shards folder. "
            f"Create one with `mmer-dist pack {{meld,ravdess}} --root RAW --out FOLDER`{upload} "
            f"(an interrupted pack resumes when run again with the same arguments)."
        ) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise damaged(where, f"is not valid JSON ({e})", f"re-run the `mmer-dist pack` (or `embed`) command that wrote "
                      f"{loc}: finished shards are kept and the index is merged again") from None
    if not isinstance(data, dict):
        raise damaged(where, f"holds {type(data).__name__} where an object / mapping was expected",
                      f"re-run the `mmer-dist pack` (or `embed`) command that wrote {loc}")
    if data.get("schema_version", 1) < SCHEMA_VERSION:
        raise IndexFormatError(
            f"{where} was written by an older mmer_dist (index format {data.get('schema_version', 1)}, this version "
            f"reads {SCHEMA_VERSION}: summaries in index.json, per-sample columns in samples/{{split}}/). "
            f"Upgrade the folder in place with `mmer-dist reindex {loc}` (resumable; reads the stats files "
            f"and each sample's KEY.json, rewrites no tar).")
    index = ShardIndex.from_json(data)
    index.origin, index.sha256 = loc, hashlib.sha256(raw).hexdigest()
    return index


SAMPLES_DIR = "samples"


def write_samples(shards_dir: str | Path, split: str, records: np.ndarray) -> None:
    """The columns of `split`'s compact index (SAMPLE_DTYPE records) as `samples/{split}/{field}.npy`, each atomically."""
    folder = Path(shards_dir) / SAMPLES_DIR / split
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_DTYPE.names:
        path = folder / f"{name}.npy"
        tmp = folder / f".{name}.npy.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(records[name]), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class Samples:
    """The compact index of one split: `samples["label"]` etc., each column memory-mapped on first use.

    Picklable without its data (a DataLoader worker maps the files again), so forked or spawned
    workers never copy the columns."""

    def __init__(self, shards_dir: str | Path, split: str, size: int) -> None:
        self.folder, self.split, self.size = Path(shards_dir) / SAMPLES_DIR / split, split, int(size)
        self._columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, name: str) -> np.ndarray:
        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = self._map(name)
        return col

    def _map(self, name: str) -> np.ndarray:
        path = self.folder / f"{name}.npy"
        fix = f"rebuild it with `mmer-dist reindex {self.folder.parent.parent}`"
        try:
            col = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{path}: a column of the compact index of split {self.split!r} cannot be read "
                                   f"({e}); {fix}") from None
        if col.dtype != SAMPLE_DTYPE[name] or col.shape != (self.size,):
            raise IndexFormatError(f"{path}: {col.shape} of {col.dtype}, expected ({self.size},) of "
                                   f"{SAMPLE_DTYPE[name]}: the index is stale or damaged; {fix}")
        return col

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_columns": {}}


class SampleRows:
    """The rows `rows` (positions) of a split's compact index, as one (e.g. a training-time fold); same access."""

    def __init__(self, samples: Samples, rows: np.ndarray) -> None:
        self.base, self.rows = samples, np.asarray(rows, dtype=np.int64)
        self._columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._columns:
            self._columns[name] = np.asarray(self.base[name][self.rows])
        return self._columns[name]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_columns": {}}


def split_samples(index: ShardIndex, split: str) -> Samples:
    """The compact index of `split` of an index read by `load_index`: memory-mapped in the shards folder, or, for
    a URL, in the node's cache (fetched once per node and index digest; index.json fetched last and checked
    against the digest, so columns of another index are never used)."""
    if index.origin is None:
        raise ValueError("split_samples needs an index read by load_index (it knows where the columns are)")
    si = split_index(index, split, index.origin)
    names = [f"{SAMPLES_DIR}/{split}/{name}.npy" for name in SAMPLE_DTYPE.names]
    folder = index.origin.cached([*names, INDEX_FILE], index.sha256)
    if not index.origin.is_local:
        digest = hashlib.sha256((folder / INDEX_FILE).read_bytes()).hexdigest()
        if digest != index.sha256:
            for n in [*names, INDEX_FILE]:
                (folder / n).unlink(missing_ok=True)
            raise IndexFormatError(f"{index.origin.shown(INDEX_FILE)} changed while its columns were fetched into "
                                   f"{folder} (someone is rewriting the shards); run again once it is complete")
    return Samples(folder, split, si.num_samples)


def split_index(index: ShardIndex, split: str, shards_dir: str | Path | Location = "") -> SplitIndex:
    """One split of an index, with an error that lists the splits present."""
    if split not in index.splits:
        raise KeyError(f"split {split!r} not in shards {shards_dir}; present: {', '.join(sorted(index.splits))}")
    return index.splits[split]


def split_members(blob: bytes, where: str = "") -> tuple[str, dict[str, bytes]]:
    """(key, {ext: bytes}) of one sample's byte range (SAMPLE_DTYPE offset/size): its consecutive USTAR
    members `KEY.EXT`, parsed in memory. ValueError when the bytes are not such members (`where` names them)."""
    members: dict[str, bytes] = {}
    key, pos = "", 0
    while pos + TAR_BLOCK <= len(blob):
        header = blob[pos: pos + TAR_BLOCK]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise ValueError(f"{where}: no tar header at byte {pos} of the sample's range") from None
        k, dot, ext = name.partition(".")
        if not dot or (key and k != key):
            raise ValueError(f"{where}: member {name!r} at byte {pos} is not part of sample {key or '?'}")
        key = k
        data = blob[pos + TAR_BLOCK: pos + TAR_BLOCK + size]
        if len(data) != size:
            raise ValueError(f"{where}: member {name} truncated ({len(data)} of {size} bytes)")
        members[ext] = data
        pos += TAR_BLOCK + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
    if not members:
        raise ValueError(f"{where}: the sample's byte range holds no tar member")
    return key, members


def size_mismatches(shards: str | Path | Location, index: ShardIndex, splits: list[str]) -> list[str]:
    """Shards of `splits` whose file is missing or not the size the index recorded (one stat or HEAD request per
    shard; nothing can be asked through a `pipe:` location, which yields no mismatch)."""
    loc = shards if isinstance(shards, Location) else Location(shards)
    out = []
    for split in splits:
        si = split_index(index, split, loc)
        for name, expected in zip(si.shards, si.shard_bytes):
            try:
                size = loc.size(name)
            except ShardMissing:
                out.append(f"{loc.shown(name)}: missing (the index says {expected} bytes)")
                continue
            if size is not None and size != expected:
                out.append(f"{loc.shown(name)}: {size} bytes, the index says {expected}")
    return out
