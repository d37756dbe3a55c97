"""Unit tests of the RAVDESS reader: tiny fake Actor_XX trees (empty files) in tmp_path.

    .venv/bin/pytest tests/unit/test_ravdess_reader.py -q
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmer_dist.corpora import read_corpus
from mmer_dist.corpora.labels import RAVDESS_LABELS
from mmer_dist.corpora.ravdess import EMPTY_AUDIO_FALLBACK, STATEMENTS, parse_name, read_ravdess, split_actors


def touch(root: Path, name: str) -> Path:
    actor = name.split("-")[6].split(".")[0]
    path = root / f"Actor_{actor}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_tree(root: Path, actors: range | list[int], ext: str = ".wav") -> None:
    """Per actor: neutral + angry speech, both statements, one repetition; plus one song."""
    for a in actors:
        for emo, inten in (("01", "01"), ("05", "02")):
            for st in ("01", "02"):
                touch(root, f"03-01-{emo}-{inten}-{st}-01-{a:02d}{ext}")
        touch(root, f"03-02-03-01-01-01-{a:02d}{ext}")


# ----------------------------------------------------------------------------- names

def test_parse_name_fields() -> None:
    n = parse_name("Actor_12/03-01-05-02-01-02-12.wav")
    assert (n.modality, n.vocal_channel, n.emotion, n.intensity, n.statement, n.repetition, n.actor) == \
        ("03", "01", "05", "02", "01", "02", "12")
    assert n.label == "angry" and n.gender == "female" and n.key == "ravdess-01-05-02-01-02-12"
    assert parse_name("01-01-08-01-02-01-07.mp4").label == "surprised"
    assert parse_name("01-01-08-01-02-01-07.mp4").gender == "male"
    assert parse_name("03-01-01-01-01-01-01.FLAC").label == "neutral"


@pytest.mark.parametrize("name, fragment", [
    ("03-01-05-02-01-02.wav", "not a RAVDESS file name"),
    ("3-01-05-02-01-02-12.wav", "not a RAVDESS file name"),
    ("readme.txt", "not a RAVDESS file name"),
    ("04-01-05-02-01-02-12.wav", "modality code 04 out of range"),
    ("03-03-05-02-01-02-12.wav", "vocal channel code 03 out of range"),
    ("03-01-09-02-01-02-12.wav", "emotion code 09 out of range"),
    ("03-01-00-02-01-02-12.wav", "emotion code 00 out of range"),
    ("03-01-05-03-01-02-12.wav", "intensity code 03 out of range"),
    ("03-01-05-02-03-02-12.wav", "statement code 03 out of range"),
    ("03-01-05-02-01-03-12.wav", "repetition code 03 out of range"),
    ("03-01-05-02-01-02-25.wav", "actor code 25 out of range"),
    ("03-01-05-02-01-02-12.mp4", "modality 03 (audio-only) needs an audio file"),
    ("01-01-05-02-01-02-12.wav", "modality 01 (audio-video) needs an .mp4"),
])
def test_parse_name_errors_name_the_file(name: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_name(f"Actor_12/{name}")
    assert name in str(err.value) and fragment in str(err.value)


# ----------------------------------------------------------------------------- reading

def test_reads_speech_excludes_songs_and_counts_them(tmp_path: Path) -> None:
    make_tree(tmp_path, range(1, 8), ext=".flac")
    utts, report = read_ravdess(tmp_path)
    assert len(utts) == 7 * 4
    assert report.skipped == {"song_excluded": 7}
    u = next(x for x in utts if x.key == "ravdess-01-05-02-02-01-03")
    assert (u.corpus, u.label, u.label_id, u.speaker) == ("ravdess", "angry", RAVDESS_LABELS.index("angry"), "Actor_03")
    assert u.text == STATEMENTS["02"] == "Dogs are sitting by the door"
    assert u.audio_path == tmp_path / "Actor_03" / "03-01-05-02-02-01-03.flac" and u.video_path is None
    assert u.meta == {"modality": "03", "vocal_channel": "speech", "emotion_code": "05", "intensity": "strong",
                      "statement": "02", "repetition": 1, "actor": 3, "gender": "male",
                      "files": ["03-01-05-02-02-01-03.flac"]}
    # Sorted by actor, keys unique.
    assert [x.meta["actor"] for x in utts] == sorted(x.meta["actor"] for x in utts)
    assert len({x.key for x in utts}) == len(utts)


def test_songs_on_request(tmp_path: Path) -> None:
    make_tree(tmp_path, range(1, 8))
    utts, report = read_ravdess(tmp_path, vocal_channels=("speech", "song"))
    assert len(utts) == 7 * 5 and not report.skipped
    songs, report = read_ravdess(tmp_path, vocal_channels=["song"])
    assert len(songs) == 7 and report.skipped == {"speech_excluded": 28}
    assert all(s.meta["vocal_channel"] == "song" and s.key.startswith("ravdess-02-") for s in songs)
    with pytest.raises(ValueError, match="vocal_channels item 'singing'"):
        read_ravdess(tmp_path, vocal_channels=("singing",))


def test_pairing_av_video_only_and_audio(tmp_path: Path) -> None:
    a = touch(tmp_path, "03-01-03-01-01-02-05.wav")
    av = touch(tmp_path, "01-01-03-01-01-02-05.mp4")
    vo = touch(tmp_path, "02-01-04-01-01-01-05.mp4")      # video-only, no audio partner
    vo2 = touch(tmp_path, "02-01-06-01-01-01-05.mp4")     # video-only with an audio partner
    a2 = touch(tmp_path, "03-01-06-01-01-01-05.flac")
    av3 = touch(tmp_path, "01-01-07-01-01-01-05.mp4")     # AV alone: audio from its track
    utts, report = read_ravdess(tmp_path, test_actors=[5])
    by_key = {u.key: u for u in utts}
    assert len(utts) == 4 and not report.skipped
    assert (by_key["ravdess-01-03-01-01-02-05"].audio_path, by_key["ravdess-01-03-01-01-02-05"].video_path) == (a, av)
    assert by_key["ravdess-01-03-01-01-02-05"].meta["modality"] == "01+03"
    assert by_key["ravdess-01-03-01-01-02-05"].meta["files"] == [av.name, a.name]
    assert (by_key["ravdess-01-04-01-01-01-05"].audio_path, by_key["ravdess-01-04-01-01-01-05"].video_path) == (None, vo)
    assert (by_key["ravdess-01-06-01-01-01-05"].audio_path, by_key["ravdess-01-06-01-01-01-05"].video_path) == (a2, vo2)
    assert (by_key["ravdess-01-07-01-01-01-05"].audio_path, by_key["ravdess-01-07-01-01-01-05"].video_path) == (av3, av3)
    assert {u.split for u in utts} == {"test"}


def test_av_preferred_over_video_only_for_video(tmp_path: Path) -> None:
    av = touch(tmp_path, "01-01-02-01-01-01-05.mp4")
    touch(tmp_path, "02-01-02-01-01-01-05.mp4")
    a = touch(tmp_path, "03-01-02-01-01-01-05.wav")
    (u,), _ = read_ravdess(tmp_path, test_actors=[5])
    assert (u.audio_path, u.video_path, u.meta["modality"]) == (a, av, "01+02+03")


def test_empty_audio_only_file_falls_back_to_a_non_empty_av_mp4(tmp_path: Path) -> None:
    wav = touch(tmp_path, "03-01-02-01-01-01-05.wav")                 # zero bytes
    av = touch(tmp_path, "01-01-02-01-01-01-05.mp4")
    av.write_bytes(b"an AV clip")
    wav2 = touch(tmp_path, "03-01-03-01-01-01-05.wav")                # zero bytes, and so is its mp4
    touch(tmp_path, "01-01-03-01-01-01-05.mp4")
    utts, report = read_ravdess(tmp_path, test_actors=[5])
    by_key = {u.key: u for u in utts}
    assert by_key["ravdess-01-02-01-01-01-05"].audio_path == av        # like a missing wav
    assert by_key["ravdess-01-03-01-01-01-05"].audio_path == wav2      # nothing better: the packer counts it
    assert report.degraded == {EMPTY_AUDIO_FALLBACK: 1} and not report.skipped
    assert report.examples[EMPTY_AUDIO_FALLBACK] == [f"{wav}: 0 bytes; audio taken from {av.name}"]


def test_duplicate_recording_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path, "03-01-02-01-01-01-05.wav")
    touch(tmp_path, "03-01-02-01-01-01-05.flac")
    with pytest.raises(ValueError, match="two files for the same recording and modality"):
        read_ravdess(tmp_path, test_actors=[5])


def test_hidden_and_resource_fork_files_ignored(tmp_path: Path) -> None:
    make_tree(tmp_path, range(1, 4))
    (tmp_path / "Actor_01" / "._03-01-01-01-01-01-01.wav").write_bytes(b"\x00")
    (tmp_path / "Actor_01" / ".DS_Store").write_bytes(b"\x00")
    (tmp_path / "README.txt").write_text("not an actor folder, ignored")
    utts, _ = read_ravdess(tmp_path)
    assert len(utts) == 12


def test_malformed_name_strict_and_lenient(tmp_path: Path) -> None:
    make_tree(tmp_path, range(1, 4))
    bad = tmp_path / "Actor_02" / "03-01-09-01-01-01-02.wav"
    bad.write_bytes(b"")
    with pytest.raises(ValueError) as err:
        read_ravdess(tmp_path)
    assert str(bad) in str(err.value) and "emotion code 09" in str(err.value)
    utts, report = read_ravdess(tmp_path, strict=False)
    assert len(utts) == 12
    assert report.skipped["malformed_name"] == 1 and str(bad) in report.examples["malformed_name"][0]


def test_actor_code_must_match_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, range(1, 4))
    wrong = tmp_path / "Actor_01" / "03-01-01-01-01-02-03.wav"
    wrong.write_bytes(b"")
    with pytest.raises(ValueError, match=r"actor code 03 does not match its folder Actor_01"):
        read_ravdess(tmp_path)


def test_root_without_actor_folders(tmp_path: Path) -> None:
    (tmp_path / "03-01-01-01-01-01-01.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a RAVDESS root: it has no Actor_XX folders"):
        read_ravdess(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        read_ravdess(tmp_path / "missing")
    (tmp_path / "Actor_01").mkdir()
    with pytest.raises(ValueError, match="no speech recordings"):
        read_corpus("ravdess", tmp_path)


# ----------------------------------------------------------------------------- actor splits

def split_of(utts: list) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for u in utts:
        out.setdefault(u.split, set()).add(u.meta["actor"])
    return {k: sorted(v) for k, v in out.items()}


def test_default_split_last_four_test_two_dev(tmp_path: Path) -> None:
    make_tree(tmp_path, range(1, 25))
    utts, _ = read_ravdess(tmp_path)
    assert split_of(utts) == {"train": list(range(1, 19)), "dev": [19, 20], "test": [21, 22, 23, 24]}
    # Default is over the actors present.
    assert split_actors(range(3, 21)) == split_actors(range(3, 21), fold="default")
    s = split_actors(range(3, 21))
    assert [a for a in s if s[a] == "test"] == [17, 18, 19, 20] and [a for a in s if s[a] == "dev"] == [15, 16]


def test_default_split_small_and_too_small() -> None:
    assert split_actors([1, 2, 3]) == {1: "train", 2: "dev", 3: "test"}
    s = split_actors(range(1, 7))
    assert Counter(s.values()) == {"train": 4, "dev": 1, "test": 1}
    with pytest.raises(ValueError, match="needs at least 3 actors"):
        split_actors([1, 2])


def test_explicit_actor_lists(tmp_path: Path) -> None:
    make_tree(tmp_path, range(1, 9))
    utts, _ = read_ravdess(tmp_path, test_actors=[1, 2], dev_actors="3, 4")
    assert split_of(utts) == {"test": [1, 2], "dev": [3, 4], "train": [5, 6, 7, 8]}
    utts, _ = read_corpus("ravdess", tmp_path, test_actors=["07", "08"])
    assert split_of(utts) == {"train": [1, 2, 3, 4, 5, 6], "test": [7, 8]}


def test_explicit_lists_errors() -> None:
    actors = range(1, 11)
    with pytest.raises(ValueError, match=r"actor\(s\) \[3\] are in both test_actors and dev_actors"):
        split_actors(actors, test_actors=[1, 2, 3], dev_actors=[3, 4])
    with pytest.raises(ValueError, match=r"actor\(s\) \[21\] listed for test/dev have no files"):
        split_actors(actors, test_actors=[21])
    with pytest.raises(ValueError, match="actor 30 out of range"):
        split_actors(actors, test_actors=[30])
    with pytest.raises(ValueError, match="'x' is not an actor number"):
        split_actors(actors, dev_actors="x")
    with pytest.raises(ValueError, match="lists an actor twice"):
        split_actors(actors, test_actors=[1, 1])
    with pytest.raises(ValueError, match="not both"):
        split_actors(actors, test_actors=[1], fold="fold0")


def test_kfold_folds_partition_actors() -> None:
    actors = list(range(1, 25))
    tests: list[int] = []
    for k in range(5):
        s = split_actors(actors, fold=f"fold{k}")
        test = [a for a in actors if s[a] == "test"]
        dev = [a for a in actors if s[a] == "dev"]
        assert len(dev) == 2 and not set(dev) & set(test)
        assert Counter(s.values())["train"] == 24 - len(test) - 2
        tests += test
    assert sorted(tests) == actors                       # every actor is tested exactly once
    assert [a for a, v in split_actors(actors, fold="fold0").items() if v == "dev"] == [23, 24]
    s = split_actors(range(1, 21), fold="fold4")
    assert s == split_actors(range(1, 21))               # fold4 over 01-20 is the default split
    s = split_actors(actors, fold="fold1of3")
    assert [a for a in actors if s[a] == "test"] == list(range(9, 17))


def test_no_random_split_and_bad_folds() -> None:
    for name in ("random", "shuffle", "fold", "fold5", "fold3of3"):
        with pytest.raises(ValueError, match="fold"):
            split_actors(range(1, 25), fold=name)
    with pytest.raises(ValueError, match="there is no random split"):
        split_actors(range(1, 25), fold="random")
    with pytest.raises(ValueError, match="needs more actors"):
        split_actors(range(1, 5), fold="fold4")          # 4 actors in 5 folds: fold4 is empty
    with pytest.raises(ValueError, match="needs more actors"):
        split_actors(range(1, 4), fold="fold0of2")       # test 2 actors + 2 dev leaves no training actor
