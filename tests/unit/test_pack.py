"""Unit tests of `mmer-dist pack` / `inspect` on tiny synthetic corpora made in tmp_path.

Round trip (every sample read back with webdataset and tarfile, stats offsets checked), identical
bytes for 1 and 2 workers, SIGKILL-and-resume equal to an uninterrupted run, job arrays and
--merge-only, each bad input counted by reason, inspect --json equal to the reader's counts,
refusing another config in the same folder and --overwrite.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import av
import pytest

from mmer_dist.cli import main as cli_main
from mmer_dist.shards.pack import build_parser as pack_parser
from mmer_dist.corpora import read_corpus
from mmer_dist.corpora.record import Utterance
from mmer_dist.corpora.synthetic import write_corpus
from mmer_dist.shards.inspect import summarize
from mmer_dist.shards.pack import PackError, pack
from mmer_dist.shards.plan import ShardJob, _planned_bytes, plan_shards
from mmer_dist.shards.writer import TarSampleWriter, WriteSpec, write_shard
from mmer_dist.shards.schema import Samples, ShardStats, load_index, split_members, stats_name

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def meld_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "meld"
    write_corpus("meld", root, n=21, seed=0, min_per_split=1)
    return root


def _files(d: Path) -> dict[str, bytes]:
    """Every file of a shards folder but the per-task lock files (`.lock-task{t}of{T}`)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".lock-")}


def _cli(*argv: str) -> int:
    return cli_main(list(argv))


def test_round_trip(meld_root: Path, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "shards"
    res = pack("meld", meld_root, out, shard_samples=4, progress=False)
    utts, _ = read_corpus("meld", meld_root)
    by_key = {u.key: u for u in utts}
    index = load_index(out)
    assert res.index is not None and not res.failed and not res.dropped
    assert sum(si.num_samples for si in index.splits.values()) == len(utts)
    assert index.group_unit == "dialogue" and index.speakers == sorted({u.speaker for u in utts})

    for split, si in index.splits.items():
        assert max(si.sizes) <= 4 and si.shard_bytes == [(out / s).stat().st_size for s in si.shards]
        assert si.class_counts == {k: n for k, n in Counter(u.label for u in utts if u.split == split).items()} | {
            k: 0 for k in index.labels if k not in {u.label for u in utts if u.split == split}}
        seen_keys, seen_labels = [], []
        for shard, size in zip(si.shards, si.sizes):
            path = out / shard
            stats = ShardStats.from_json(json.loads((out / stats_name(shard)).read_text()))
            raw = path.read_bytes()
            assert stats.bytes == len(raw) and len(stats.samples) == size
            samples = list(wds.WebDataset(str(path), shardshuffle=False))
            assert [s["__key__"] for s in samples] == [e.key for e in stats.samples]
            for s, entry in zip(samples, stats.samples):
                u = by_key[s["__key__"]]
                meta = json.loads(s["json"])
                assert (meta["label"], meta["label_id"], meta["split"], meta["speaker"]) == (u.label, u.label_id, split, u.speaker)
                assert meta["labels"] == index.labels and meta["profile"] == "train"
                assert meta["meta"]["dialogue_id"] == u.meta["dialogue_id"]
                assert s["txt"].decode() == u.text
                assert set(s) - {"__key__", "__url__", "__local_path__"} == {"json", "txt", "flac", "mp4"}
                for ext, (offset, n) in entry.members.items():   # stats offsets point at the member bytes
                    assert raw[offset:offset + n] == s[ext]
                with av.open(io.BytesIO(s["flac"])) as c:
                    assert (c.streams.audio[0].rate, c.streams.audio[0].channels) == (16000, 1)
                    assert sum(f.samples for f in c.decode(audio=0)) / 16000 == pytest.approx(entry.duration, abs=1e-3)
                with av.open(io.BytesIO(s["mp4"])) as c:
                    assert not c.streams.audio and c.streams.video[0].height <= 224
                seen_keys.append(entry.key)
                seen_labels.append(entry.label_id)
                assert (entry.speaker, entry.group) == (u.speaker, u.meta["dialogue_id"])
            with tarfile.open(path) as tf:                   # plain tarfile agrees, fixed member metadata
                members = tf.getmembers()
                assert all(m.mtime == 0 and m.uname == "mmer" and m.uid == 0 for m in members)
                assert [m.name for m in members] == [f"{e.key}.{x}" for e in stats.samples for x in sorted(e.members)]
        cols = Samples(out, split, si.num_samples)          # the compact index agrees with the stats, in order
        assert cols["label"].tolist() == seen_labels and len(seen_keys) == si.num_samples
        assert [index.speakers[i] for i in cols["speaker"]] == [by_key[k].speaker for k in seen_keys]
        assert cols["group"].tolist() == [by_key[k].meta["dialogue_id"] for k in seen_keys]
        raws = {s: (out / s).read_bytes() for s in si.shards}
        for i, key in enumerate(seen_keys):                  # each byte range holds exactly the sample's members
            shard, off, size = si.shards[cols["shard"][i]], int(cols["offset"][i]), int(cols["size"][i])
            assert split_members(raws[shard][off:off + size])[0] == key


def test_tar_layout_is_webdataset_tarwriter(tmp_path: Path) -> None:
    import webdataset as wds

    sample = {"json": b'{"a": 1}', "txt": "h\u00e9llo".encode(), "flac": bytes(range(256)) * 3, "mp4": b"x" * 1000}
    ours, theirs = io.BytesIO(), io.BytesIO()
    w = TarSampleWriter(ours)
    w.write("k-1", sample)
    w.write("k-2", {"json": b"{}"})
    w.close()
    tw = wds.TarWriter(theirs, user="mmer", group="mmer", mode=0o444, encoder=False, mtime=0)
    tw.write({"__key__": "k-1", **sample})
    tw.write({"__key__": "k-2", "json": b"{}"})
    tw.close()
    assert ours.getvalue() == theirs.getvalue()


def test_plan_is_deterministic_and_respects_limits(meld_root: Path) -> None:
    utts, _ = read_corpus("meld", meld_root)
    a = plan_shards(utts, "meld", 0, 3, 10**12)
    assert [[u.key for u in j.utterances] for j in a] == [[u.key for u in j.utterances] for j in plan_shards(list(reversed(utts)), "meld", 0, 3, 10**12)]
    assert [[u.key for u in j.utterances] for j in a] != [[u.key for u in j.utterances] for j in plan_shards(utts, "meld", 1, 3, 10**12)]
    assert all(len(j.utterances) <= 3 for j in a)
    assert sorted(u.key for j in a for u in j.utterances) == sorted(u.key for u in utts)
    limit = 3 * max(u.video_path.stat().st_size for u in utts)     # a few clips per shard by bytes
    b = plan_shards(utts, "meld", 0, 1000, limit)
    size = lambda j: sum(_planned_bytes(u) for u in j.utterances)  # noqa: E731
    assert len(b) > 3 and all(size(j) <= limit for j in b)
    for j, nxt in zip(b, b[1:]):                                  # greedy: the next sample did not fit
        if j.split == nxt.split:
            assert size(j) + _planned_bytes(nxt.utterances[0]) > limit
    assert [j.name for j in b if j.split == "train"][:2] == ["meld-train-000000.tar", "meld-train-000001.tar"]


def test_same_bytes_for_1_and_2_workers(meld_root: Path, tmp_path: Path) -> None:
    pack("meld", meld_root, tmp_path / "w1", shard_samples=3, workers=1, progress=False)
    res = pack("meld", meld_root, tmp_path / "w2", shard_samples=3, workers=2, progress=False)
    assert len(res.written) == res.planned_shards == 9
    one, two = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert one.keys() == two.keys() and len([k for k in one if k.endswith(".tar")]) == 9
    assert [k for k in one if one[k] != two[k]] == []


def test_raw_profile_keeps_original_bytes(meld_root: Path, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "raw"
    pack("meld", meld_root, out, profile="raw", shard_samples=100, progress=False)
    utts = {u.key: u for u in read_corpus("meld", meld_root)[0]}
    index = load_index(out)
    assert index.profile == "raw"
    n = 0
    for si in index.splits.values():
        for shard in si.shards:
            for s in wds.WebDataset(str(out / shard), shardshuffle=False):
                u = utts[s["__key__"]]
                assert s["mp4"] == u.video_path.read_bytes()
                meta = json.loads(s["json"])
                assert meta["audio_member"] == "mp4" and "flac" not in s and meta["modalities"] == ["audio", "text", "video"]
                assert meta["duration"] > 0.5
                n += 1
    assert n == len(utts)


def _run_pack_subprocess(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "mmer_dist.cli", "pack", "meld", "--root", str(root), "--out", str(out),
                             "--shard-samples", "1", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigkill_then_resume_equals_uninterrupted(meld_root: Path, tmp_path: Path, workers: str) -> None:
    ref, out = tmp_path / "ref", tmp_path / "killed"
    pack("meld", meld_root, ref, shard_samples=1, progress=False)
    proc = _run_pack_subprocess(meld_root, out, "--workers", workers)
    deadline = time.time() + 60
    while not list(out.glob("*.stats.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    children = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    time.sleep(0.5)                            # workers die with their parent (PR_SET_PDEATHSIG): give them a moment
    assert not (out / "index.json").exists(), "the pack finished before it was killed: the test proves nothing"
    n_done = len(list(out.glob("*.stats.json")))
    assert 1 <= n_done < 21
    for tar in out.glob("*.tar"):              # a tar under its final name is always whole
        with tarfile.open(tar) as tf:
            tf.getmembers()
    # leftovers of a crash at the worst moments: a temp file, a tar renamed but without stats
    (out / ".meld-test-000002.tar.tmp12345").write_bytes(b"half a tar")
    (out / "meld-test-000003.tar").write_bytes(b"renamed, then killed before the stats")
    res = pack("meld", meld_root, out, shard_samples=1, progress=False)
    assert len(res.resumed) == n_done and len(res.written) == 21 - n_done
    assert _files(out) == _files(ref)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and not p.name.startswith(".lock-")]
    assert workers == "1" or children, "no worker processes seen: the 2-worker run did not use a pool"
    assert [c for c in children if _alive(c)] == [], "packing processes outlived the killed pack"


def test_a_second_pack_of_the_same_task_is_refused(meld_root: Path, tmp_path: Path) -> None:
    from mmer_dist.shards.pack import _TaskLock

    out = tmp_path / "s"
    out.mkdir()
    held = _TaskLock(out, 0, 1)
    try:
        with pytest.raises(PackError, match=f"another pack \\(pid {os.getpid()}"):
            pack("meld", meld_root, out, progress=False)
    finally:
        held.release()
    assert pack("meld", meld_root, out, progress=False).index is not None


def test_job_array_tasks_then_merge(meld_root: Path, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "array"
    pack("meld", meld_root, ref, shard_samples=5, progress=False)
    r0 = pack("meld", meld_root, out, shard_samples=5, task_id=0, num_tasks=2, progress=False)
    assert r0.index is None and not (out / "index.json").exists()
    assert sorted(r0.written) == sorted(p.name for p in out.glob("*.tar"))
    with pytest.raises(PackError, match="not complete"):
        pack("meld", meld_root, out, shard_samples=5, merge_only=True, progress=False)
    os.environ["SLURM_ARRAY_TASK_ID"], os.environ["SLURM_ARRAY_TASK_COUNT"] = "1", "2"
    try:
        r1 = pack("meld", meld_root, out, shard_samples=5, progress=False)   # task id from the environment
    finally:
        del os.environ["SLURM_ARRAY_TASK_ID"], os.environ["SLURM_ARRAY_TASK_COUNT"]
    assert r1.index is not None and not set(r0.written) & set(r1.written)   # the last task merges
    (out / "index.json").unlink()
    (out / "skipped.json").unlink()
    assert _cli("pack", "meld", "--root", str(meld_root), "--out", str(out), "--shard-samples", "5", "--merge-only") == 0
    assert _files(out) == _files(ref)


def test_refuses_other_config_unless_overwrite(meld_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    pack("meld", meld_root, out, shard_samples=5, progress=False)
    with pytest.raises(PackError) as e:
        pack("meld", meld_root, out, shard_samples=6, seed=3, progress=False)
    assert "shard_samples: existing 5, now 6" in str(e.value) and "seed: existing 0, now 3" in str(e.value)
    assert "--overwrite" in str(e.value)
    assert _cli("pack", "meld", "--root", str(meld_root), "--out", str(out), "--profile", "raw") == 2
    assert "profile: existing 'train', now 'raw'" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")                 # a file the packer did not write survives
    res = pack("meld", meld_root, out, shard_samples=6, seed=3, overwrite=True, progress=False)
    assert res.index is not None and json.loads((out / "pack.json").read_text())["config"]["shard_samples"] == 6
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list(out.glob("*.tar"))) == res.planned_shards
    again = pack("meld", meld_root, out, shard_samples=6, seed=3, progress=False)   # same config: all resumed
    assert again.written == [] and len(again.resumed) == res.planned_shards


def _damage(root: Path) -> dict[str, Path]:
    """One clip per kind of bad input, from the train split; returns kind -> path."""
    clips = sorted((root / "train_splits").glob("*.mp4"))
    kinds = {"corrupt": clips[0], "truncated": clips[1], "zero": clips[2], "missing": clips[3], "dir": clips[4]}
    kinds["corrupt"].write_bytes(os.urandom(3000))
    data = kinds["truncated"].read_bytes()
    kinds["truncated"].write_bytes(data[: len(data) // 2])
    kinds["zero"].write_bytes(b"")
    kinds["missing"].unlink()
    kinds["dir"].unlink()
    kinds["dir"].mkdir()                                    # unreadable: a folder where the clip should be
    return kinds


@pytest.mark.parametrize("missing_media", ["keep", "skip"])
def test_bad_inputs_counted_and_reported(tmp_path: Path, missing_media: str, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "raw"
    write_corpus("meld", root, n=21, seed=1, min_per_split=1)
    kinds = _damage(root)
    out = tmp_path / "s"
    code = _cli("pack", "meld", "--root", str(root), "--out", str(out), "--missing-media", missing_media)
    assert code == 0
    printed = capsys.readouterr().out
    sk = json.loads((out / "skipped.json").read_text())
    where = "dropped" if missing_media == "skip" else "degraded"
    # the reader reports clips absent from the folder (missing, a folder, zero bytes) ...
    assert sk["reader"]["skipped" if missing_media == "skip" else "degraded"] == {"missing_clip": 2, "empty_clip": 1}
    # ... the packer the ones FFmpeg cannot use, once per file, naming it
    assert sk["media"][where] == {"corrupt_media": 1, "truncated_media": 1}
    assert str(kinds["corrupt"]) in sk["media"]["files"]["corrupt_media"][0]
    assert "audio/video" in sk["media"]["files"]["truncated_media"][0]
    assert sk[where] == {"corrupt_media": 1, "truncated_media": 1, "missing_clip": 2, "empty_clip": 1}
    assert "corrupt_media 1" in printed and "truncated_media 1" in printed
    index = load_index(out)
    train = index.splits["train"]
    if missing_media == "keep":
        assert train.num_samples == 7 and train.modalities == {"text": 7, "audio": 2, "video": 2}
    else:
        assert train.num_samples == 2
    s = summarize(out)
    assert s["skipped"][where]["corrupt_media"] == 1 and s["splits"]["train"]["samples"] == train.num_samples
    assert _cli("pack", "meld", "--root", str(root), "--out", str(out), "--missing-media", missing_media, "--strict") == 1


def test_worker_survives_unreadable_and_broken_files(tmp_path: Path) -> None:
    """Files that go bad after reading (a folder, zero bytes, garbage) never crash the shard."""
    (tmp_path / "out").mkdir()
    (tmp_path / "a_dir.wav").mkdir()
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100 + b"garbage" * 50)
    mk = lambda k, **kw: Utterance(key=k, corpus="meld", split="train", label="joy", label_id=1, speaker="x", **kw)  # noqa: E731
    job = ShardJob(0, "meld-train-000000.tar", "train", [
        mk("k-dir", text="hi", audio_path=tmp_path / "a_dir.wav"),
        mk("k-zero", text=None, audio_path=tmp_path / "zero.wav"),          # nothing left: dropped
        mk("k-junk", text="yo", audio_path=tmp_path / "junk.mp4", video_path=tmp_path / "junk.mp4"),
        mk("k-gone", text="so", video_path=tmp_path / "gone.mp4"),
    ])
    spec = WriteSpec(str(tmp_path / "out"), str(tmp_path), "meld", ("neutral", "joy"), "train", 64, 4.0, 23, 16000, "keep")
    outcome = write_shard(job, spec)
    assert outcome.error == "" and outcome.samples == 3
    got = {(s["key"], s["reason"], s["dropped"], tuple(s["modalities"])) for s in outcome.skipped}
    assert got == {("k-dir", "unreadable_file", False, ("audio",)), ("k-zero", "empty_file", True, ("audio",)),
                   ("k-junk", "corrupt_media", False, ("audio", "video")), ("k-gone", "missing_file", False, ("video",))}
    stats = json.loads((tmp_path / "out" / "meld-train-000000.stats.json").read_text())
    assert [s["key"] for s in stats["samples"]] == ["k-dir", "k-junk", "k-gone"] and stats["modalities"] == {"text": 3}


def test_ravdess_zero_length_wav_and_inspect_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "raw"
    write_corpus("ravdess", root, n=32, seed=0, n_actors=4, video=False)
    wavs = sorted(root.rglob("03-*.wav"))
    wavs[0].write_bytes(b"")                              # zero-length: audio-only RAVDESS keeps text only
    utts, report = read_corpus("ravdess", root, strict=False)
    out = tmp_path / "s"
    assert _cli("pack", "ravdess", "--root", str(root), "--out", str(out), "--shard-samples", "4") == 0
    assert _cli("inspect", str(out), "--json") == 0
    printed = capsys.readouterr().out
    s = json.loads(printed[printed.index("\n{") + 1:])     # after pack's summary lines
    assert s["skipped"]["degraded"] == {"empty_file": 1}
    for split in {u.split for u in utts}:
        want = Counter(u.label for u in utts if u.split == split)
        got = {k: v for k, v in s["splits"][split]["classes"].items() if v}
        assert got == dict(want) and s["splits"][split]["samples"] == sum(want.values())
    assert s["totals"]["samples"] == len(utts) and s["splits"]["train"]["modalities"]["text"] == s["splits"]["train"]["samples"]


def test_inspect_json_cli_and_plots(meld_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    pack("meld", meld_root, out, shard_samples=4, progress=False)
    capsys.readouterr()
    assert _cli("inspect", str(out), "--json", "--plots", str(tmp_path / "plots")) == 0
    s = json.loads(capsys.readouterr().out)
    utts, _ = read_corpus("meld", meld_root)
    for split in ("train", "dev", "test"):
        assert s["splits"][split]["samples"] == sum(u.split == split for u in utts)
        assert {k: v for k, v in s["splits"][split]["classes"].items() if v} == dict(Counter(u.label for u in utts if u.split == split))
        assert (tmp_path / "plots" / f"{split}_classes.png").stat().st_size > 1000
    assert set(s["skipped"]) >= {"dropped", "degraded"} and s["totals"]["bytes"] > 0
    assert _cli("inspect", str(out)) == 0
    text = capsys.readouterr().out
    assert "neutral" in text and "imbalance" in text and "skipped inputs: none" in text
    assert _cli("inspect", str(tmp_path)) == 2                  # not a shards folder: a clear error


def test_inspect_never_opens_tars(meld_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack("meld", meld_root, out, shard_samples=4, progress=False)
    before = summarize(out)
    assert before["damaged"] == []
    for tar in out.glob("*.tar"):
        tar.write_bytes(b"")
    after = summarize(out)               # the same summary; the sizes (one stat each) no longer match the index
    assert {k: v for k, v in after.items() if k != "damaged"} == {k: v for k, v in before.items() if k != "damaged"}
    assert len(after["damaged"]) == len(list(out.glob("*.tar"))) and "0 bytes, the index says" in after["damaged"][0]


@pytest.mark.parametrize("spec", ["meld.yaml", "ravdess.yaml"])
def test_packing_specs_parse_as_pack_flags(spec: str) -> None:
    import yaml

    data = yaml.safe_load((REPO / "shards" / spec).read_text())
    argv = [data.pop("corpus")]
    for k, v in data.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args = pack_parser().parse_args(argv)                   # an unknown key fails here
    assert args.corpus == spec.split(".")[0] and args.out.startswith("shards/out/")


@pytest.mark.parametrize("profile", ["train", "raw"])
def test_clip_without_video_track_keeps_audio(tmp_path: Path, profile: str) -> None:
    """MELD clips that are audio-only mp4s: the audio is packed, the video counted as missing per sample."""
    root = tmp_path / "raw"
    write_corpus("meld", root, n=21, seed=2, min_per_split=1, video=False)
    res = pack("meld", root, tmp_path / "s", profile=profile, progress=False)
    assert res.degraded == {"no_video_stream": 21} and not res.dropped
    for si in res.index.splits.values():
        assert si.modalities == {"text": 7, "audio": 7}
    if profile == "raw":
        import webdataset as wds

        shard = tmp_path / "s" / res.index.splits["dev"].shards[0]
        s = next(iter(wds.WebDataset(str(shard), shardshuffle=False)))
        assert json.loads(s["json"])["audio_member"] == "mp4" and "mp4" in s
