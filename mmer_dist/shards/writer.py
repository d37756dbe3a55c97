"""Writing one shard for `mmer-dist pack` (and `mmer-dist embed`): tar bytes, offsets, stats, completeness.

    from mmer_dist.shards.writer import WriteSpec, write_shard, is_complete
    outcome = write_shard(job, spec)          # never raises; outcome.error says what went wrong
    assert outcome.error or is_complete(Path(spec.out), job.name)

A shard goes to `.NAME.tmpPID`, is fsynced and renamed into place (its sha256 computed on the way
out); then the byte offset and size of every member is read back (`member_offsets`) and
`NAME.stats.json` is written atomically, last (`write_tar` then `write_stats`: the protocol both pack
and embed follow). A shard is complete iff its stats file exists (and its tar, unless every sample of
it was skipped: then no tar is written). Folders of 10^4-10^5 shards: `list_folder` reads a folder
once, `complete_shards` and `remove_leftovers` work from that one listing (no glob or stat per shard).
`TarSampleWriter` writes the same bytes as webdataset's TarWriter without importing torch.

Bad media never raise: `_build_sample` counts every failure by reason (kept without the modality or
dropped, per `missing_media`) into the shard's stats.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import tarfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mmer_dist.corpora.record import Utterance
from mmer_dist.shards import media
from mmer_dist.shards.plan import ShardJob
from mmer_dist.shards.schema import AUDIO_EXTS, SampleEntry, ShardStats, stats_name, write_json_atomic

TAR_MTIME = 0                   # fixed member metadata: the bytes depend on the content only
TAR_USER = "mmer"
TAR_MODE = 0o444


@dataclass
class ShardOutcome:
    """What a worker returns for one shard (never an exception)."""

    name: str
    samples: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""                # a shard-level failure (disk full, bug): the shard stays incomplete
    peak_rss_mb: float = 0.0


@dataclass(frozen=True)
class WriteSpec:
    """What a worker needs to write shards (picklable: it crosses into spawned worker processes)."""

    out: str
    root: str
    corpus: str
    labels: tuple[str, ...]
    profile: str
    video_size: int
    video_fps: float
    video_crf: int
    sample_rate: int
    missing_media: str


def _rel(path: Path | None, root: str) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _build_sample(u: Utterance, spec: WriteSpec) -> tuple[dict[str, bytes] | None, list[dict[str, Any]], float]:
    """(members by extension or None when dropped, failures, audio seconds) for one utterance."""
    members: dict[str, bytes] = {}
    failures: list[dict[str, Any]] = []
    failed: dict[str, dict[str, Any]] = {}      # path -> failure: a file broken for audio is broken for video
    durations: dict[str, float] = {}
    extra: dict[str, Any] = {}

    def attempt(kind: str, path: Path, fn: Callable[[], media.Encoded]) -> media.Encoded | None:
        if str(path) in failed:
            failed[str(path)]["modalities"].append(kind)
            return None
        try:
            return fn()
        except media.MediaError as e:
            failure = {"key": u.key, "reason": e.reason, "path": str(path), "modalities": [kind],
                       "detail": e.detail[:200]}
            failures.append(failure)
            if e.reason in media.FILE_REASONS:    # not e.g. no_audio_stream: the video track may be fine
                failed[str(path)] = failure
            return None

    if spec.profile == "train":
        if u.audio_path is not None:
            enc = attempt("audio", u.audio_path, lambda: media.encode_audio(u.audio_path, spec.sample_rate))
            if enc is not None:
                members["flac"], durations["audio"] = enc.data, enc.duration
        if u.video_path is not None:
            enc = attempt("video", u.video_path, lambda: media.encode_video(
                u.video_path, spec.video_size, spec.video_fps, spec.video_crf))
            if enc is not None:
                members["mp4"], durations["video"] = enc.data, enc.duration
    else:
        wanted: dict[Path, list[str]] = {}          # file -> kinds it provides (MELD: one mp4 for both)
        for kind, path in (("audio", u.audio_path), ("video", u.video_path)):
            if path is not None:
                wanted.setdefault(Path(path), []).append(kind)
        for path, kinds in wanted.items():
            try:
                got = media.verify_tracks(path, tuple(kinds))
                data = media.read_bytes(path)
            except media.MediaError as e:
                failures.append({"key": u.key, "reason": e.reason, "path": str(path), "modalities": kinds,
                                 "detail": e.detail[:200]})
                continue
            ok = [k for k in kinds if not isinstance(got[k], media.MediaError)]
            for k in kinds:
                if isinstance(got[k], media.MediaError):   # e.g. a video without its audio track: video kept
                    failures.append({"key": u.key, "reason": got[k].reason, "path": str(path), "modalities": [k],
                                     "detail": got[k].detail[:200]})
            if not ok:
                continue
            ext = path.suffix.lower().lstrip(".") or ok[0]
            if ext in members:
                raise ValueError(f"{u.key}: two source files with the extension .{ext} ({path}); "
                                 f"the raw profile stores one member per extension")
            members[ext] = data
            durations.update({k: float(got[k]) for k in ok})
            if "audio" in ok and ext not in AUDIO_EXTS:
                extra["audio_member"] = ext                  # audio lives inside the video file

    has_text = bool(u.text)
    modalities = sorted(["text"] * has_text + [m for m in ("audio", "video") if m in durations])
    dropped = bool(failures) and (spec.missing_media == "skip" or not modalities)
    for f in failures:
        f["dropped"] = dropped
    if dropped:
        return None, failures, 0.0
    if has_text:
        members["txt"] = u.text.encode("utf-8")
    meta = {
        "key": u.key, "corpus": u.corpus, "split": u.split, "label": u.label, "label_id": u.label_id,
        "labels": list(spec.labels), "speaker": u.speaker,
        "duration": round(durations.get("audio", durations.get("video", 0.0)), 6),
        "source": {"audio": _rel(u.audio_path, spec.root), "video": _rel(u.video_path, spec.root)},
        "profile": spec.profile, "modalities": modalities, "meta": u.meta, **extra,
    }
    if spec.profile == "train":
        meta["media"] = {"sample_rate": spec.sample_rate, "video_size": spec.video_size, "video_fps": spec.video_fps}
    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return members, failures, durations.get("audio", 0.0)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_folder(out: Path) -> set[str]:
    """The names in `out`, read once (empty when it does not exist)."""
    try:
        with os.scandir(out) as it:
            return {e.name for e in it}
    except FileNotFoundError:
        return set()


def remove_leftovers(out: Path, names: Iterable[str], listing: set[str]) -> int:
    """Delete the temp files (`.NAME.tmpPID`, `.NAME.stats.json.tmpPID`) that killed runs left for the
    shards `names`, found in one `listing` of `out`; returns how many. The caller owns these shards
    (no other process writes them), so nothing live is deleted."""
    bases = {n[: -len(".tar")] for n in names}
    gone = 0
    for entry in listing:
        if entry.startswith(".") and ".tmp" in entry and entry[1:].split(".", 1)[0] in bases:
            (out / entry).unlink(missing_ok=True)
            gone += 1
    return gone


def complete_shards(out: Path, names: Iterable[str], listing: set[str]) -> set[str]:
    """The shards of `names` that are complete (see `is_complete`), from one `listing` of `out`."""
    done = set()
    for name in names:
        if stats_name(name) in listing and (name in listing or _has_no_samples(out, name)):
            done.add(name)
    return done


def member_offsets(tar_path: Path) -> dict[str, dict[str, list[int]]]:
    """key -> {ext: [byte offset of the data, size]} read back from a finished tar."""
    offsets: dict[str, dict[str, list[int]]] = {}
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            offsets.setdefault(key, {})[ext] = [m.offset_data, m.size]
    return offsets


class TarSampleWriter:
    """Writes samples exactly as `webdataset.TarWriter(f, encoder=False, mtime=0, ...)` does.

    Same member order (extensions sorted), names `KEY.EXT`, USTAR headers, stream mode "w|";
    a unit test checks the bytes against webdataset's writer. Not webdataset itself because
    importing it imports torch (~0.7 GB and ~1.5 s in every worker process).
    """

    def __init__(self, fileobj: Any) -> None:
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode = len(data), TAR_MTIME, TAR_MODE
            ti.uname = ti.gname = TAR_USER
            self.tar.addfile(ti, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


class _HashingFile:
    """A write-only file that hashes what goes through it (tarfile's stream mode only calls write)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)


def write_tar(out: Path, name: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[dict[str, dict[str, list[int]]], int, str]:
    """Tar (key, members) samples to `.NAME.tmpPID`, fsync, rename over `out/name`:
    (member offsets, bytes, sha256 of the bytes).

    No sample: no tar is left (a stale one is deleted), ({}, 0, "") -- the stats file alone then
    marks the shard done.
    """
    tmp = out / f".{name}.tmp{os.getpid()}"
    final = out / name
    n = 0
    with open(tmp, "wb") as f:
        hashed = _HashingFile(f)
        writer = TarSampleWriter(hashed)
        for key, members in samples:
            writer.write(key, members)
            n += 1
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    if not n:
        tmp.unlink()
        final.unlink(missing_ok=True)
        return {}, 0, ""
    os.replace(tmp, final)            # over a stale tar of a killed run, atomically
    fsync_dir(out)
    return member_offsets(final), final.stat().st_size, hashed.sha.hexdigest()


def write_stats(out: Path, stats: ShardStats) -> None:
    """`{shard}.stats.json`, atomically and last: from now on the shard counts as complete."""
    write_json_atomic(out / stats_name(stats.shard), stats.to_json())
    fsync_dir(out)


def write_shard(job: ShardJob, spec: WriteSpec, progress: Callable[[int], None] | None = None) -> ShardOutcome:
    """Write one shard: tmp file, fsync, rename, offsets, stats last. Never raises."""
    out = Path(spec.out)
    outcome = ShardOutcome(job.name)
    try:
        entries: list[tuple[Utterance, float]] = []
        class_counts = Counter()
        modalities = Counter()
        duration = 0.0

        def built() -> Iterable[tuple[str, dict[str, bytes]]]:
            nonlocal duration
            for u in job.utterances:
                try:
                    members, failures, audio_s = _build_sample(u, spec)
                except Exception as e:  # a bug or an exotic file must not take the shard down
                    members, failures, audio_s = None, [{
                        "key": u.key, "reason": "error", "path": str(u.audio_path or u.video_path or ""),
                        "modalities": [], "dropped": True, "detail": f"{type(e).__name__}: {e}"[:300]}], 0.0
                outcome.skipped.extend(failures)
                if members is not None:
                    yield u.key, members
                    entries.append((u, audio_s))
                    class_counts[u.label] += 1
                    meta = json.loads(members["json"])
                    modalities.update(meta["modalities"])
                    duration += meta["duration"]
                if progress is not None:
                    progress(1)

        offsets, size, sha256 = write_tar(out, job.name, built())
        stats = ShardStats(
            shard=job.name, split=job.split,
            samples=[SampleEntry(u.key, u.label_id, offsets[u.key], round(a, 6), u.speaker, u.group) for u, a in entries],
            bytes=size,
            class_counts={k: class_counts[k] for k in spec.labels if class_counts[k]},
            modalities={k: modalities[k] for k in ("text", "audio", "video") if modalities[k]},
            duration=round(duration, 6),
            skipped=outcome.skipped,
            sha256=sha256,
        )
        write_stats(out, stats)
        outcome.samples = len(entries)
    except Exception as e:
        outcome.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    outcome.peak_rss_mb = peak_rss_mb()
    return outcome


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM, which (unlike ru_maxrss) does not inherit
    the parent's peak through fork+exec of a spawned worker."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_complete(out: Path, name: str) -> bool:
    """True when shard `name` in `out` has its stats (and its tar, unless every sample was skipped)."""
    stats = out / stats_name(name)
    if not stats.exists():
        return False
    return (out / name).exists() or _has_no_samples(out, name)


def _has_no_samples(out: Path, name: str) -> bool:
    """True when the stats of `name` say every sample was skipped (then no tar is expected)."""
    try:
        return not json.loads((out / stats_name(name)).read_text(encoding="utf-8"))["samples"]
    except (OSError, ValueError, KeyError):
        return False
