"""Real-data tests of the corpus readers: the MELD CSVs and RAVDESS files in ../shared/data.

Skipped with a reason when the data is absent (it is never part of the project).

    .venv/bin/pytest tests/real/test_real_corpora.py -q
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmer_dist.corpora import read_corpus
from mmer_dist.corpora.labels import RAVDESS_LABELS
from mmer_dist.corpora.meld import read_meld
from mmer_dist.corpora.ravdess import read_ravdess

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MELD = DATA / "meld"
RAVDESS = DATA / "ravdess"
RAVDESS_ORIGINAL = DATA / "ravdess-original"

needs_meld = pytest.mark.skipif(not (MELD / "train_sent_emo.csv").is_file() or not (MELD / "dev_sent_emo.csv").is_file(),
                                reason=f"real MELD CSVs not found in {MELD}")
needs_ravdess = pytest.mark.skipif(not RAVDESS.is_dir(), reason=f"real RAVDESS audio not found in {RAVDESS}")
needs_original = pytest.mark.skipif(not (RAVDESS_ORIGINAL / "Actor_05").is_dir(),
                                    reason=f"RAVDESS originals not found in {RAVDESS_ORIGINAL}/Actor_05")

MELD_COUNTS = {
    "train": {"neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109, "sadness": 683, "disgust": 271, "fear": 268},
    "dev": {"neutral": 470, "joy": 163, "anger": 153, "surprise": 150, "sadness": 111, "fear": 40, "disgust": 22},
}


@pytest.fixture(scope="module")
def meld() -> list:
    utts, report = read_meld(MELD)
    assert report.to_dict() == {"skipped": {}, "degraded": {}, "examples": {}}   # no clips here: text-only, silent
    return utts


@needs_meld
def test_meld_row_and_class_counts(meld: list) -> None:
    assert Counter(u.split for u in meld) == {"train": 9989, "dev": 1109}
    for split, counts in MELD_COUNTS.items():
        assert Counter(u.label for u in meld if u.split == split) == counts
    assert len({u.key for u in meld}) == len(meld)
    assert all(u.audio_path is None and u.video_path is None for u in meld)
    # Quirks of the release survive: one-digit hours are kept verbatim and still parse.
    odd = [u for u in meld if u.meta["start"].startswith("0:")]
    assert odd and all(u.meta["start_s"] is not None for u in odd)


@needs_meld
def test_meld_no_mojibake_left(meld: list) -> None:
    for u in meld:
        assert u.text and "â€" not in u.text and "\ufffd" not in u.text and "Ã" not in u.text, u.key
    assert any("’" in u.text for u in meld)          # typographic apostrophes are kept, not straightened


@needs_meld
def test_meld_cp1252_and_mojibake_copies_round_trip(tmp_path: Path, meld: list) -> None:
    import ftfy.bad_codecs  # noqa: F401  (registers sloppy-windows-1252)

    original = (MELD / "train_sent_emo.csv").read_bytes().decode("utf-8")
    cp = tmp_path / "cp1252"
    moji = tmp_path / "mojibake"
    cp.mkdir()
    moji.mkdir()
    (cp / "train_sent_emo.csv").write_bytes(original.encode("cp1252"))
    garbled = original.encode("utf-8").decode("sloppy-windows-1252")   # UTF-8 read as cp1252
    assert "â€™" in garbled
    (moji / "train_sent_emo.csv").write_bytes(garbled.encode("utf-8"))

    expected = [(u.key, u.speaker, u.text) for u in meld if u.split == "train"]
    for root in (cp, moji):
        utts, _ = read_corpus("meld", root)
        assert [(u.key, u.speaker, u.text) for u in utts] == expected, root.name


@needs_ravdess
def test_ravdess_flac_actors_01_20() -> None:
    files = sorted(RAVDESS.glob("Actor_*/*.flac"))
    assert len(files) == 1200
    utts, report = read_ravdess(RAVDESS)
    assert not report.skipped and not report.degraded
    assert len(utts) == 1200
    per_actor = Counter(u.meta["actor"] for u in utts)
    assert per_actor == {a: 60 for a in range(1, 21)}
    for a in range(1, 21):
        labels = Counter(u.label for u in utts if u.meta["actor"] == a)
        assert labels == {lab: (4 if lab == "neutral" else 8) for lab in RAVDESS_LABELS}
    assert all(u.audio_path and u.audio_path.suffix == ".flac" and u.video_path is None for u in utts)
    actors = {s: sorted({u.meta["actor"] for u in utts if u.split == s}) for s in ("train", "dev", "test")}
    assert actors == {"train": list(range(1, 15)), "dev": [15, 16], "test": [17, 18, 19, 20]}


@needs_original
def test_ravdess_original_actor_05_pairing() -> None:
    folder = RAVDESS_ORIGINAL / "Actor_05"
    assert len(list(folder.glob("*.wav"))) == 60 and len(list(folder.glob("*.mp4"))) == 4
    utts, report = read_ravdess(RAVDESS_ORIGINAL, test_actors=[5])
    assert len(utts) == 60 and not report.skipped and {u.split for u in utts} == {"test"}
    assert all(u.audio_path is not None and u.audio_path.suffix == ".wav" for u in utts)
    with_video = {u.key: u for u in utts if u.video_path is not None}
    assert len(with_video) == 4
    av = [u for u in with_video.values() if u.video_path.name.startswith("01-")]
    vo = [u for u in with_video.values() if u.video_path.name.startswith("02-")]
    assert len(av) == 3 and len(vo) == 1
    for u in with_video.values():
        # the mp4 and the wav of one utterance are the same recording: codes after MM agree
        assert u.video_path.stem[3:] == u.audio_path.stem[3:]
        assert u.audio_path.name.startswith("03-")
    assert vo[0].meta["modality"] == "02+03" and av[0].meta["modality"] == "01+03"
