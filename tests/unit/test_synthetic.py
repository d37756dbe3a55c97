"""Synthetic corpora: raw layouts, real decodable media (PyAV and decord), class balance,
byte determinism, refusals, odd media for other tests, and per-modality learnability.

    .venv/bin/pytest tests/unit/test_synthetic.py -q
"""

from __future__ import annotations

import csv
import hashlib
import re
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from mmer_dist.corpora.labels import MELD_LABELS, RAVDESS_LABELS
from mmer_dist.corpora.synthetic import (
    MELD_CLIP_DIR,
    MELD_CSV,
    MELD_PROPORTIONS,
    build_parser,
    min_n,
    write_corpus,
    write_meld,
    write_ravdess,
)
from mmer_dist.corpora.synthetic_media import synth_audio, synth_frames, write_mp4, write_wav

TINY = dict(seconds=(0.5, 0.8), frame_size=32, fps=10.0)
RAVDESS_NAME = re.compile(r"^(0[13])-01-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)\.(wav|mp4)$")


# --------------------------------------------------------------------------- helpers


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read_meld(root: Path) -> dict[str, list[dict[str, str]]]:
    out = {}
    for split, name in MELD_CSV.items():
        with open(root / name, encoding="utf-8", newline="") as fh:
            out[split] = list(csv.DictReader(fh))
    return out


def clip_path(root: Path, split: str, row: dict[str, str]) -> Path:
    return root / MELD_CLIP_DIR[split] / f"dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}.mp4"


def ms(stamp: str) -> int:
    h, m, rest = stamp.split(":")
    s, milli = rest.split(",")
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1000 + int(milli)


def decode_av(path: Path) -> tuple[np.ndarray | None, np.ndarray, int | None]:
    """(frames [T,H,W,3] or None, mono audio, sample rate) with PyAV."""
    frames, audio, sr = [], [], None
    with av.open(str(path)) as c:
        for frame in c.decode(*c.streams):
            if isinstance(frame, av.VideoFrame):
                frames.append(frame.to_ndarray(format="rgb24"))
            else:
                audio.append(frame.to_ndarray().reshape(-1))
                sr = frame.sample_rate
    return (np.stack(frames) if frames else None), (np.concatenate(audio) if audio else np.zeros(0)), sr


def audio_features(y: np.ndarray, sr: int) -> np.ndarray:
    """Log band energies (mean, std), loudness, envelope modulation spectrum, autocorrelation pitch."""
    n, hop = 512, 256
    fr = np.lib.stride_tricks.sliding_window_view(y, n)[::hop] * np.hanning(n)
    spec = np.abs(np.fft.rfft(fr, axis=1)) + 1e-6
    rms = np.sqrt((fr ** 2).mean(1))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    edges = np.geomspace(80, sr / 2, 17)
    logb = np.log(np.stack([spec[:, (freqs >= a) & (freqs < b)].mean(1) for a, b in zip(edges[:-1], edges[1:])], 1))
    mod = np.abs(np.fft.rfft(rms - rms.mean(), 64))[1:16]
    loud = fr[int(np.argmax(rms))]
    ac = np.correlate(loud, loud, "full")[n - 1:]
    lo, hi = sr // 500, sr // 70
    lag = lo + int(np.argmax(ac[lo:hi]))
    return np.concatenate([logb.mean(0), logb.std(0), [np.log(rms.mean() + 1e-6), rms.std() / (rms.mean() + 1e-6),
                                                       np.log(sr / lag)], mod / (mod.sum() + 1e-9)])


def face_features(frames: np.ndarray, k: int = 12) -> np.ndarray:
    """Darkness relative to skin on a k x k grid of the face's bounding box (eyes, brows, mouth), mean and std over frames."""
    grids = []
    for fr in frames.astype(np.float32)[:: max(1, len(frames) // 4)]:
        ys, xs = np.where(np.abs(fr - fr[0, 0]).sum(-1) > 60)
        crop = fr[ys.min():ys.max() + 1, xs.min():xs.max() + 1] if len(ys) else fr
        mid = crop.shape[0] // 2
        skin = np.median(crop[max(0, mid - 2):mid + 2].reshape(-1, 3), 0)
        dark = np.abs(crop - skin).sum(-1) / 255.0
        iy = (np.arange(k) * crop.shape[0] / k).astype(int)
        ix = (np.arange(k) * crop.shape[1] / k).astype(int)
        grids.append(dark[iy][:, ix])
    g = np.stack(grids)
    return np.concatenate([g.mean(0).ravel(), g.std(0).ravel()])


def held_out_accuracy(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
    model.fit(X[train], y[train])
    return float(np.mean(model.predict(X[~train]) == y[~train]))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def meld_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("meld") / "raw"
    write_meld(root, n=80, seed=3, **TINY)
    return root


@pytest.fixture(scope="module")
def ravdess_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ravdess") / "raw"
    write_ravdess(root, n=30, seed=3, n_actors=2, **TINY)
    return root


# --------------------------------------------------------------------------- MELD layout


def test_meld_layout_header_and_rows(meld_root: Path) -> None:
    names = sorted(p.name for p in meld_root.iterdir())
    assert names == sorted(list(MELD_CSV.values()) + list(MELD_CLIP_DIR.values()))
    for name in MELD_CSV.values():
        raw = (meld_root / name).read_bytes()
        assert raw.startswith(b"Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,"
                              b"Season,Episode,StartTime,EndTime\r\n")
        assert raw.count(b"\r\n") == raw.count(b"\n")            # CRLF rows, like the real CSVs
        raw.decode("utf-8")
    rows = read_meld(meld_root)
    assert sum(len(r) for r in rows.values()) == 80
    time_re = re.compile(r"^\d\d:\d\d:\d\d,\d\d\d$")
    for split, split_rows in rows.items():
        assert [int(r["Sr No."]) for r in split_rows] == list(range(1, len(split_rows) + 1))
        keys = {(r["Dialogue_ID"], r["Utterance_ID"]) for r in split_rows}
        assert len(keys) == len(split_rows)                      # dia/utt ids unique per split
        clips = {p.name for p in (meld_root / MELD_CLIP_DIR[split]).iterdir()}
        assert clips == {f"dia{d}_utt{u}.mp4" for d, u in keys}  # one clip per row, nothing else
        for r in split_rows:
            assert r["Emotion"] in MELD_LABELS and r["Utterance"].strip()
            assert r["Sentiment"] in ("neutral", "positive", "negative")
            assert time_re.match(r["StartTime"]) and time_re.match(r["EndTime"])
            assert 500 <= ms(r["EndTime"]) - ms(r["StartTime"]) <= 800


def test_meld_every_class_in_every_split(meld_root: Path) -> None:
    for split, split_rows in read_meld(meld_root).items():
        counts = {c: sum(r["Emotion"] == c for r in split_rows) for c in MELD_LABELS}
        assert min(counts.values()) >= 3, (split, counts)


@pytest.mark.parametrize("proportions", [None, {"neutral": 0.5, "joy": 0.2, "surprise": 0.1, "anger": 0.05,
                                                "sadness": 0.05, "disgust": 0.05, "fear": 0.05}])
def test_meld_class_balance_as_configured(tmp_path: Path, proportions: dict[str, float] | None) -> None:
    n = 400
    write_meld(tmp_path / "raw", n=n, seed=0, clips=False, proportions=proportions)
    rows = [r for split_rows in read_meld(tmp_path / "raw").values() for r in split_rows]
    assert len(rows) == n
    target = proportions or MELD_PROPORTIONS
    for c in MELD_LABELS:
        count = sum(r["Emotion"] == c for r in rows)
        assert abs(count - n * target[c]) <= 1, (c, count, n * target[c])
    split_sizes = {s: len(r) for s, r in read_meld(tmp_path / "raw").items()}
    assert abs(split_sizes["train"] / n - 0.7) < 0.03 and abs(split_sizes["test"] / n - 0.2) < 0.03


def test_meld_default_is_meld_like_imbalance(tmp_path: Path) -> None:
    summary = write_corpus("meld", tmp_path / "raw", seed=0, clips=False)
    rows = [r for split_rows in read_meld(tmp_path / "raw").values() for r in split_rows]
    share = {c: sum(r["Emotion"] == c for r in rows) / len(rows) for c in MELD_LABELS}
    assert 0.44 <= share["neutral"] <= 0.50 and share["fear"] <= 0.04 and share["disgust"] <= 0.04
    assert "600 utterances" in summary and "CSVs only" in summary


# --------------------------------------------------------------------------- media decode


def test_meld_clips_decode_with_pyav_and_decord(meld_root: Path) -> None:
    import decord

    rows = read_meld(meld_root)
    checked = 0
    for split in ("train", "test"):
        for r in rows[split][:4]:
            path = clip_path(meld_root, split, r)
            seconds = (ms(r["EndTime"]) - ms(r["StartTime"])) / 1000
            with av.open(str(path)) as c:
                v, a = c.streams.video[0], c.streams.audio[0]
                assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
                assert (v.width, v.height) == (32, 32) and a.sample_rate == 16000 and a.channels == 1
            frames, audio, sr = decode_av(path)
            assert frames is not None and len(frames) == max(1, round(seconds * 10))
            assert sr == 16000 and seconds * sr <= len(audio) <= seconds * sr + 3 * 1024
            assert np.abs(audio).max() > 0.02                           # a voice, not silence
            vr = decord.VideoReader(str(path))
            assert len(vr) == len(frames) and vr[0].shape == (32, 32, 3)
            ar = decord.AudioReader(str(path), sample_rate=16000, mono=True)
            assert ar.shape[0] == 1 and ar.shape[1] >= seconds * 16000
            checked += 1
    assert checked == 8


def test_meld_without_video_writes_audio_only_clips(tmp_path: Path) -> None:
    write_meld(tmp_path / "raw", n=63, seed=0, video=False, seconds=(0.5, 0.6))
    clips = sorted((tmp_path / "raw" / "train_splits").glob("*.mp4"))
    assert clips
    with av.open(str(clips[0])) as c:
        assert len(c.streams.video) == 0 and c.streams.audio[0].codec_context.name == "aac"


# --------------------------------------------------------------------------- RAVDESS layout


def test_ravdess_layout_and_pairs(ravdess_root: Path) -> None:
    import decord

    actors = sorted(p.name for p in ravdess_root.iterdir())
    assert actors == ["Actor_01", "Actor_02"]
    for actor_dir in ravdess_root.iterdir():
        names = sorted(p.name for p in actor_dir.iterdir())
        assert len(names) == 2 * 15                                  # ceil(30 / 2) utterances, wav + mp4 each
        emotions = set()
        for name in names:
            m = RAVDESS_NAME.match(name)
            assert m, name
            assert int(m.group(6)) == int(actor_dir.name[-2:])
            assert (m.group(1) == "03") == (m.group(7) == "wav")
            emotions.add(int(m.group(2)))
            if name.endswith(".wav"):
                assert (actor_dir / ("01" + name[2:-4] + ".mp4")).exists()   # the AV twin
        assert emotions == set(range(1, len(RAVDESS_LABELS) + 1))
    wav_path = next(ravdess_root.glob("Actor_01/03-*.wav"))
    with wave.open(str(wav_path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 48000)
        assert 0.5 * 48000 <= w.getnframes() <= 0.8 * 48000
    mp4 = ravdess_root / "Actor_01" / ("01" + wav_path.name[2:-4] + ".mp4")
    frames, audio, sr = decode_av(mp4)
    assert frames is not None and sr == 48000 and len(audio) >= 0.5 * 48000
    assert len(decord.VideoReader(str(mp4))) == len(frames)


def test_ravdess_neutral_has_only_normal_intensity(tmp_path: Path) -> None:
    write_ravdess(tmp_path / "raw", n_actors=1, video=False, sample_rate=16000, seconds=(0.3, 0.4))
    names = [p.name for p in (tmp_path / "raw" / "Actor_01").iterdir()]
    assert len(names) == 60                                          # the full RAVDESS speech design
    assert not [n for n in names if n.startswith("03-01-01-02")]


# --------------------------------------------------------------------------- determinism and refusals


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    opts = dict(n=63, **TINY)
    write_meld(tmp_path / "a", seed=7, **opts)
    write_meld(tmp_path / "b", seed=7, **opts)
    write_meld(tmp_path / "c", seed=8, **opts)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert tree_hash(tmp_path / "a") != tree_hash(tmp_path / "c")
    ropts = dict(n=8, n_actors=1, sample_rate=16000, **TINY)
    write_ravdess(tmp_path / "ra", seed=7, **ropts)
    write_ravdess(tmp_path / "rb", seed=7, **ropts)
    write_ravdess(tmp_path / "rc", seed=8, **ropts)
    assert tree_hash(tmp_path / "ra") == tree_hash(tmp_path / "rb") != tree_hash(tmp_path / "rc")


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_corpus("meld", tmp_path / "raw", n=63, clips=False)
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    write_corpus("meld", tmp_path / "empty", n=63, clips=False)     # an empty folder is fine


@pytest.mark.parametrize("kwargs, message", [
    (dict(corpus="iemocap"), "unknown corpus"),
    (dict(n=20), "too small"),
    (dict(proportions={"happy": 1.0}), "unknown classes"),
    (dict(proportions={"neutral": 1.0}), "no share"),
    (dict(noise=1.5), "noise"),
    (dict(frame_size=33), "even"),
])
def test_bad_options_are_explained(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"corpus": "meld", "n": 100, "clips": False, **kwargs}
    corpus, n = args.pop("corpus"), args.pop("n")
    with pytest.raises(ValueError, match=message):
        write_corpus(corpus, tmp_path / "raw", n=n, **args)


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmer_dist.cli import main

    assert main(["synth", "ravdess", "--out", str(tmp_path / "raw"), "--n", "96", "--no-video"]) == 0
    out = capsys.readouterr().out
    assert "RAVDESS" in out and "no video" in out
    # default 12 actors; n=96 is 8 utterances per actor: every emotion once per actor
    assert len(list((tmp_path / "raw").glob("Actor_*"))) == 12
    wavs = list((tmp_path / "raw").glob("Actor_*/03-01-*.wav"))
    assert len(wavs) == 96 and len({w.name.split("-")[2] for w in wavs}) == 8
    assert not list((tmp_path / "raw").rglob("*.mp4"))


@pytest.mark.parametrize("args, message", [
    (["meld", "--n", "60"], "--n 60 is too small for a synthetic meld corpus: each of the 7 classes needs 3 "
                            "utterances in each of the 3 splits; use --n >= 63"),
    (["meld", "--n", "0"], "--n 0 is too small for a synthetic meld corpus"),
    (["ravdess", "--n", "48"], "--n 48 is too small for a synthetic ravdess corpus: splits are by actor, so each "
                               "of the 12 actors needs all 8 emotions; use --n >= 96"),
    (["ravdess", "--n", "721"], "--n 721 is too large for a synthetic ravdess corpus: 12 actors x 60 speech "
                                "utterances = 720; use --n <= 720"),
])
def test_cli_synth_refuses_an_n_that_misses_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    args: list[str], message: str) -> None:
    from mmer_dist.cli import main

    assert main(["synth", *args, "--out", str(tmp_path / "raw")]) == 2
    assert f"mmer-dist synth: {message}" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()                        # nothing written
    assert f">= {min_n('meld')}" in build_parser().format_help()    # the minimum is documented in --help


def test_cli_synth_into_a_non_empty_folder_is_a_named_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmer_dist.cli import main

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "keep.txt").write_text("mine")
    assert main(["synth", "meld", "--out", str(tmp_path / "raw"), "--n", "63"]) == 2
    err = capsys.readouterr().err
    assert f"mmer-dist synth: {tmp_path / 'raw'} is not empty" in err and "choose another --out" in err
    assert "Traceback" not in err and [p.name for p in (tmp_path / "raw").iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- helpers for other tests


def test_media_helpers_make_odd_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = synth_frames("joy", rng, n=1, size=32)
    assert frames.shape == (1, 32, 32, 3) and frames.dtype == np.uint8
    one = write_mp4(tmp_path / "one_frame.mp4", frames, 10.0, None, 16000)
    got, audio, sr = decode_av(one)
    assert got is not None and len(got) == 1 and len(audio) == 0 and sr is None

    empty_audio = write_mp4(tmp_path / "no_samples.mp4", synth_frames("fear", rng, n=3, size=32), 10.0,
                            np.zeros(0, np.float32), 16000)
    with av.open(str(empty_audio)) as c:
        assert len(c.streams.audio) == 0                               # the mp4 muxer drops an empty track
    got, audio, _ = decode_av(empty_audio)
    assert got is not None and len(got) == 3 and len(audio) == 0
    blip = write_mp4(tmp_path / "blip.mp4", None, 10.0, np.zeros(100, np.float32), 16000)   # silent, 100 samples
    got, audio, sr = decode_av(blip)
    assert got is None and sr == 16000 and 100 <= len(audio) <= 3 * 1024 and np.abs(audio).max() < 1e-3

    y = synth_audio("anger", rng, sr=16000, seconds=0.5)
    assert y.dtype == np.float32 and y.shape == (8000,) and 0.05 < np.abs(y).max() <= 1.0
    write_wav(tmp_path / "stereo.wav", np.stack([y, -y], 1), 16000)
    with wave.open(str(tmp_path / "stereo.wav")) as w:
        assert (w.getnchannels(), w.getnframes(), w.getframerate()) == (2, 8000, 16000)
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with wave.open(str(tmp_path / "empty.wav")) as w:
        assert w.getnframes() == 0
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), 10.0, None, 16000)


# --------------------------------------------------------------------------- learnability


def test_meld_every_modality_is_learnable_alone(tmp_path: Path) -> None:
    """Logistic regression on simple features of each modality alone beats chance (1/7) clearly on held-out data."""
    from sklearn.feature_extraction.text import CountVectorizer

    root = tmp_path / "raw"
    balanced = {c: 1.0 for c in MELD_LABELS}
    write_meld(root, n=210, seed=11, proportions=balanced, split_fractions={"train": 0.6, "dev": 0.1, "test": 0.3},
               seconds=(0.8, 1.2), frame_size=48, noise=0.1)
    labels, texts, A, V, is_test = [], [], [], [], []
    for split, split_rows in read_meld(root).items():
        for r in split_rows:
            frames, audio, sr = decode_av(clip_path(root, split, r))
            labels.append(r["Emotion"])
            texts.append(r["Utterance"])
            A.append(audio_features(audio, sr))
            V.append(face_features(frames))
            is_test.append(split == "test")
    y, train = np.array(labels), ~np.array(is_test)
    vec = CountVectorizer(token_pattern=r"[A-Za-z\u2019']+").fit([t for t, tr in zip(texts, train) if tr])
    accuracy = {
        "audio": held_out_accuracy(np.array(A), y, train),
        "video": held_out_accuracy(np.array(V), y, train),
        "text": held_out_accuracy(vec.transform(texts).toarray().astype(float), y, train),
    }
    print("held-out accuracy per modality (chance 0.14):", accuracy)
    for modality, acc in accuracy.items():
        assert acc >= 0.45, (modality, accuracy)


def test_ravdess_audio_is_learnable_across_actors(tmp_path: Path) -> None:
    """Speaker-independent: train on actors 1-4, test on 5-6 (8 classes, chance 0.125)."""
    root = tmp_path / "raw"
    write_ravdess(root, n_actors=6, video=False, sample_rate=16000, seconds=(0.8, 1.2), seed=5, noise=0.1)
    X, y, train = [], [], []
    for path in sorted(root.glob("Actor_*/03-*.wav")):
        with wave.open(str(path)) as w:
            audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        X.append(audio_features(audio, 16000))
        y.append(int(path.name.split("-")[2]))
        train.append(int(path.stem.split("-")[6]) <= 4)
    acc = held_out_accuracy(np.array(X), np.array(y), np.array(train))
    print("RAVDESS audio, held-out actors:", acc)
    assert acc >= 0.4
