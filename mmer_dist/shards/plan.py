"""Shard planning for `mmer-dist pack`: the config that decides the output bytes, and which sample goes where.

    from mmer_dist.shards.plan import PackConfig, parse_bytes, plan_shards
    jobs = plan_shards(utterances, "meld", seed=0, shard_samples=1000, shard_bytes=parse_bytes("1GB"))
    for job in jobs:                         # ShardJob(index, name, split, utterances)
        print(job.name, len(job.utterances))

Per split, utterances sorted by key are shuffled with `random.Random(f"{seed}:{split}")` and cut
into shards of at most `shard_samples` samples and at most `shard_bytes` *planned* bytes (source
file sizes + transcript + SAMPLE_OVERHEAD; known before any transcoding). The plan is a pure
function of the utterances and the config, so every worker, array task or resumed run computes the
same one. `PackConfig` is what `pack.json` stores and a resumed pack compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from mmer_dist.corpora.record import Utterance
from mmer_dist.shards import media
from mmer_dist.shards.schema import SCHEMA_VERSION, shard_name

PROFILES = ("train", "raw")
MISSING_MEDIA = ("keep", "skip")
SPLIT_ORDER = ("train", "dev", "test")
SAMPLE_OVERHEAD = 3072          # planned bytes per sample beyond its files: tar headers + KEY.json


class PackError(RuntimeError):
    """A pack that cannot proceed; the message says what to do."""


# --------------------------------------------------------------------------- config


def parse_bytes(value: str | int) -> int:
    """'1GB' -> 10**9, '500MiB' -> 500 * 2**20, '4096' -> 4096."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", value.upper())
    if not m:
        raise ValueError(f"--shard-bytes {value!r}: expected a size like 500MB, 1GB, 64MiB or 1000000")
    num, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** " KMGT".index(unit or " "))


@dataclass(frozen=True)
class PackConfig:
    """Everything that decides the output bytes; stored in pack.json and compared on resume."""

    corpus: str
    root: str
    profile: str = "train"
    shard_samples: int = 1000
    shard_bytes: int = 10**9
    seed: int = 0
    splits: tuple[str, ...] = ()            # empty: every split the reader finds
    video_size: int = 224
    video_fps: float = 8.0
    video_crf: int = 23
    sample_rate: int = media.SAMPLE_RATE
    missing_media: str = "keep"
    reader_options: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.missing_media not in MISSING_MEDIA:
            raise ValueError(f"missing_media={self.missing_media!r}; choose one of {', '.join(MISSING_MEDIA)}")
        if self.shard_samples < 1 or self.shard_bytes < 1:
            raise ValueError("--shard-samples and --shard-bytes must be >= 1")
        if self.video_size < 8 or self.video_fps <= 0:
            raise ValueError("--video-size must be >= 8 and --video-fps > 0")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["splits"] = list(self.splits)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def reader_options_for(corpus: str, splits: tuple[str, ...], missing_media: str,
                        extra: dict[str, Any] | None) -> dict[str, Any]:
    """The options `read_corpus` gets for `corpus` (stored in PackConfig.reader_options); `extra` adds to them."""
    opts: dict[str, Any] = {}
    if corpus == "meld":
        opts["missing_media"] = missing_media
        if splits:
            opts["splits"] = list(splits)
    elif corpus == "ravdess":
        opts["strict"] = False        # malformed file names are counted, not fatal
    for k, v in (extra or {}).items():
        if v not in (None, "", [], ()):
            opts[k] = list(v) if isinstance(v, tuple) else v
    return opts


# --------------------------------------------------------------------------- plan


@dataclass
class ShardJob:
    """One unit of work: a shard name and the utterances planned into it, in order."""

    index: int                     # position in the global plan (job arrays take index % T == t)
    name: str
    split: str
    utterances: list[Utterance]


def _planned_bytes(u: Utterance) -> int:
    size = SAMPLE_OVERHEAD + len((u.text or "").encode("utf-8"))
    for p in {u.audio_path, u.video_path} - {None}:
        try:
            size += os.stat(p).st_size
        except OSError:
            pass                   # counted when the worker meets it
    return size


def plan_shards(utterances: list[Utterance], corpus: str, seed: int, shard_samples: int,
                shard_bytes: int) -> list[ShardJob]:
    """Deterministic shuffle per split, cut by sample count and planned bytes (see module doc)."""
    by_split: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_split.setdefault(u.split, []).append(u)
    order = [s for s in SPLIT_ORDER if s in by_split] + sorted(set(by_split) - set(SPLIT_ORDER))
    jobs: list[ShardJob] = []
    for split in order:
        items = sorted(by_split[split], key=lambda u: u.key)
        keys = [u.key for u in items]
        if len(set(keys)) != len(keys):
            dup = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
            raise PackError(f"duplicate utterance keys in split {split}: {dup}; the reader must give unique keys")
        random.Random(f"{seed}:{split}").shuffle(items)
        current: list[Utterance] = []
        size = 0
        for u in items:
            b = _planned_bytes(u)
            if current and (len(current) >= shard_samples or size + b > shard_bytes):
                jobs.append(ShardJob(len(jobs), shard_name(corpus, split, _count(jobs, split)), split, current))
                current, size = [], 0
            current.append(u)
            size += b
        if current:
            jobs.append(ShardJob(len(jobs), shard_name(corpus, split, _count(jobs, split)), split, current))
    return jobs


def _count(jobs: list[ShardJob], split: str) -> int:
    return sum(1 for j in jobs if j.split == split)
