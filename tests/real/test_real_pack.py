"""Real-data tests of the packer: the real MELD CSVs (text-only) and real RAVDESS audio.

Skipped with a reason when ../shared/data is absent (the data is never part of the project).

    .venv/bin/pytest tests/real/test_real_pack.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import pytest

from mmer_dist.cli import main as cli_main
from mmer_dist.shards.pack import pack
from mmer_dist.shards.schema import load_index

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MELD = DATA / "meld"
RAVDESS_ORIGINAL = DATA / "ravdess-original"

# /work/shared/data/README.md
MELD_COUNTS = {
    "train": {"neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109, "sadness": 683, "disgust": 271, "fear": 268},
    "dev": {"neutral": 470, "joy": 163, "anger": 153, "surprise": 150, "sadness": 111, "fear": 40, "disgust": 22},
}


def _csv_rows(path: Path) -> int:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return sum(1 for row in csv.reader(f) if any(c.strip() for c in row)) - 1


@pytest.mark.skipif(not (MELD / "train_sent_emo.csv").is_file() or not (MELD / "dev_sent_emo.csv").is_file(),
                    reason=f"real MELD CSVs not found in {MELD}")
def test_real_meld_csvs_pack_text_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "meld"
    assert cli_main(["pack", "meld", "--root", str(MELD), "--out", str(out), "--workers", "2",
                     "--shard-samples", "3000"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["skipped"]["total_dropped"] == 0 and s["skipped"]["total_degraded"] == 0
    for split, counts in MELD_COUNTS.items():
        rows = _csv_rows(MELD / f"{split}_sent_emo.csv")
        assert rows == sum(counts.values())                       # 9,989 and 1,109
        sp = s["splits"][split]
        assert sp["samples"] == rows
        assert sp["classes"] == {k: counts[k] for k in sp["classes"]}
        assert sp["modalities"] == {"text": rows}                 # no clips here: text only
    index = load_index(out)
    assert [len(index.splits[s].shards) for s in ("train", "dev")] == [4, 1]
    assert index.splits["train"].num_samples == 9989
    keys = {key for name in index.splits["train"].shards for key in _tar_keys(out / name)}
    assert len(keys) == 9989                                      # unique keys, every row once
    assert len(index.speakers) > 200 and index.group_unit == "dialogue"


def _tar_keys(path: Path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tf:
        return {m.name.split(".")[0] for m in tf.getmembers()}


@pytest.mark.skipif(not (RAVDESS_ORIGINAL / "Actor_05").is_dir(),
                    reason=f"RAVDESS originals not found in {RAVDESS_ORIGINAL}/Actor_05")
def test_real_ravdess_originals_transcode(tmp_path: Path) -> None:
    """One real actor (48 kHz wavs, one stereo; 720p AV mp4s) -> train profile: every sample decodes."""
    import webdataset as wds

    out = tmp_path / "rav"
    res = pack("ravdess", RAVDESS_ORIGINAL, out, reader_options={"test_actors": [5]}, shard_samples=100,
               video_size=112, video_fps=4, progress=False)
    assert res.index is not None and not res.dropped and not res.degraded
    test = res.index.splits["test"]
    assert test.num_samples == 60 and test.modalities == {"text": 60, "audio": 60, "video": 4}   # 4 mp4s pair with wavs
    for s in wds.WebDataset(str(out / test.shards[0]), shardshuffle=False):
        if "flac" in s:
            with av.open(io.BytesIO(s["flac"])) as c:
                assert (c.streams.audio[0].rate, c.streams.audio[0].channels) == (16000, 1)
        if "mp4" in s:
            with av.open(io.BytesIO(s["mp4"])) as c:
                v = c.streams.video[0]
                assert (v.width, v.height) == (200, 112) and not c.streams.audio
