"""Shard planning for `mmer-dist pack`: the config that decides the output bytes, and which sample goes where.

    from mmer_dist.shards.plan import PackConfig, Plan, parse_bytes, plan_shards
    jobs = plan_shards(utterances, "meld", seed=0, shard_samples=1000, shard_bytes=parse_bytes("1GB"))
    for job in jobs:                         # ShardJob(index, name, split, utterances, sizes)
        print(job.name, len(job.utterances))
    plan = Plan.from_jobs(cfg.digest(), jobs)   # keys and planned sizes only: what plan.json holds

Per split, utterances sorted by key are shuffled with `random.Random(f"{seed}:{split}")` and cut
into shards of at most `shard_samples` samples and at most `shard_bytes` *planned* bytes (source
file sizes + transcript + SAMPLE_OVERHEAD; known before any transcoding). The plan is a pure
function of the utterances, their files' sizes and the config. A source file that cannot be
stat'ed stops the plan (`PackError` naming it): a plan that depended on a transient failure would
differ between tasks.

Plan once, verify everywhere: the first task records the `Plan` (every shard's keys and planned
sizes, and its digest) in OUT/plan.json, written once and atomically (`record_plan`); every later
task, resumed run or merge compares its own plan with it and is refused, with the differences
named (`Plan.differences`), when its view of the corpus differs. `PackConfig` is what `pack.json`
stores and a resumed pack compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmer_dist.corpora.record import Utterance
from mmer_dist.shards import media
from mmer_dist.shards.schema import PLAN_FILE, SCHEMA_VERSION, ShardStats, shard_name, stats_name

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
    sizes: list[int] = field(default_factory=list)   # planned bytes of each utterance, same order


def _planned_bytes(u: Utterance) -> int:
    """Source file sizes + transcript + SAMPLE_OVERHEAD; a file that cannot be stat'ed is a PackError."""
    size = SAMPLE_OVERHEAD + len((u.text or "").encode("utf-8"))
    for p in {u.audio_path, u.video_path} - {None}:
        try:
            size += os.stat(p).st_size
        except OSError as e:
            raise PackError(
                f"cannot stat {p} (utterance {u.key}): {e.strerror or e}. The corpus reader listed it a moment "
                f"ago, so the file changed or the file system is failing; the plan must not depend on that "
                f"(tasks would disagree). Restore or remove the file, then run the pack again.") from None
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
        sizes: list[int] = []
        size = 0
        in_split = 0                       # shards of this split so far (the next shard's number)
        for u in items:
            b = _planned_bytes(u)
            if current and (len(current) >= shard_samples or size + b > shard_bytes):
                jobs.append(ShardJob(len(jobs), shard_name(corpus, split, in_split), split, current, sizes))
                current, sizes, size, in_split = [], [], 0, in_split + 1
            current.append(u)
            sizes.append(b)
            size += b
        if current:
            jobs.append(ShardJob(len(jobs), shard_name(corpus, split, in_split), split, current, sizes))
    return jobs


@dataclass(frozen=True)
class PlannedShard:
    """One shard of the recorded plan: its keys and their planned sizes, in shard order."""

    index: int
    name: str
    split: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """Which key goes in which shard (what OUT/plan.json holds); no Utterance objects."""

    config_hash: str               # PackConfig.digest() of the pack that made it
    shards: tuple[PlannedShard, ...]

    @classmethod
    def from_jobs(cls, config_hash: str, jobs: list[ShardJob]) -> "Plan":
        return cls(config_hash, tuple(PlannedShard(j.index, j.name, j.split, tuple(u.key for u in j.utterances),
                                                   tuple(j.sizes)) for j in jobs))

    def to_json(self) -> dict[str, Any]:
        return {"config_hash": self.config_hash, "digest": self.digest(),
                "shards": [{"name": s.name, "split": s.split, "keys": list(s.keys), "sizes": list(s.sizes)}
                           for s in self.shards]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        shards = tuple(PlannedShard(i, d["name"], d["split"], tuple(d["keys"]), tuple(d["sizes"]))
                       for i, d in enumerate(data["shards"]))
        return cls(data["config_hash"], shards)

    def digest(self) -> str:
        h = hashlib.sha256(self.config_hash.encode())
        for s in self.shards:
            h.update(json.dumps([s.name, s.split, s.keys, s.sizes]).encode())
        return h.hexdigest()[:16]

    def differences(self, other: "Plan", limit: int = 5) -> list[str]:
        """What differs between this (recorded) plan and `other` (this task's view), one line each."""
        if self.config_hash != other.config_hash:
            return [f"packing arguments: config hash {self.config_hash}, now {other.config_hash} (see pack.json)"]
        mine, theirs = _sizes_by_key(self), _sizes_by_key(other)
        lines = []
        gone, new = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        if gone:
            lines.append(f"{len(gone)} planned utterance(s) missing now: {', '.join(gone[:limit])}")
        if new:
            lines.append(f"{len(new)} utterance(s) not in the plan: {', '.join(new[:limit])}")
        resized = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        if resized:
            lines.append(f"{len(resized)} utterance(s) whose planned size changed (a source file changed, appeared or went "
                         f"missing): " + ", ".join(
                f"{k} planned {mine[k]} bytes, now {theirs[k]}" for k in resized[:limit]))
        if not lines:
            moved = [s.name for s, t in zip(self.shards, other.shards) if s != t]
            lines.append(f"{len(self.shards)} shards planned, now {len(other.shards)}; shards cut differently: "
                         f"{', '.join(moved[:limit])}")
        return lines


def check_stats(planned: PlannedShard, stats: ShardStats) -> str:
    """'' when the stats hold exactly the planned keys (kept, in plan order, plus dropped); else what differs."""
    where = stats_name(planned.name)
    if (stats.shard, stats.split) != (planned.name, planned.split):
        return f"{where}: describes shard {stats.shard} of split {stats.split}, planned {planned.name} of {planned.split}"
    dropped = {s["key"] for s in stats.skipped if s.get("dropped")}
    kept = [e.key for e in stats.samples]
    expected = [k for k in planned.keys if k not in dropped]
    if kept == expected and dropped <= set(planned.keys):
        return ""
    extra = sorted((set(kept) | dropped) - set(planned.keys))
    lacking = sorted(set(planned.keys) - set(kept) - dropped)
    detail = (f"holds {len(extra)} unplanned key(s) ({', '.join(extra[:3])})" if extra else "") + \
             (f"{'; ' if extra else ''}lacks {len(lacking)} planned key(s) ({', '.join(lacking[:3])})" if lacking else "")
    return f"{where}: {detail or 'the planned keys in another order'}"


def _sizes_by_key(plan: Plan) -> dict[str, int]:
    return {k: n for s in plan.shards for k, n in zip(s.keys, s.sizes)}


def record_plan(out: Path, plan: Plan, root: str) -> Plan:
    """Write OUT/plan.json unless a task did already (exactly once: hard link of a finished temp file,
    which fails if the name exists), then check `plan` against the recorded one; PackError naming the
    differences and the fix when they differ."""
    path = out / PLAN_FILE
    if not path.exists():
        tmp = out / f".{PLAN_FILE}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(plan.to_json(), f, separators=(",", ":"))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)             # atomic create-if-absent: the first task wins
        except FileExistsError:
            pass
        except OSError:                    # a file system without hard links: rename (last writer wins)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    recorded = load_plan(out)
    if recorded.digest() != plan.digest():
        lines = "\n".join(f"  - {d}" for d in recorded.differences(plan))
        raise PackError(
            f"this task's view of the corpus at {root} differs from the plan the first task recorded in {path} "
            f"(digest {recorded.digest()}, this task {plan.digest()}):\n{lines}\n"
            f"Every task must pack the same plan. Restore the corpus as it was when the pack started and run "
            f"this task again, or start over in a new --out (or delete {out}).")
    return recorded


def load_plan(out: Path) -> Plan:
    """OUT/plan.json, with an error that says how to get one."""
    path = out / PLAN_FILE
    try:
        return Plan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise PackError(f"{path} not found: run the pack (any task) first; it records the plan") from None
    except (ValueError, KeyError) as e:
        raise PackError(f"{path} is damaged ({e}); delete it and run the pack again (it is rewritten from "
                        f"the corpus; a plan that differs from the shards already written is refused at merge)") from None
