"""Short real-data training runs: the pipeline learns on the real MELD transcripts and RAVDESS speech,
and the real RAVDESS formats go through `mmer-dist predict`.

Each test is a cut-down version of a run in benchmarks/README.md (a few hundred steps at most,
one process, one thread; about 1-2 minutes each on an idle 2-core machine) and asserts that the
held-out Macro-F1 is clearly above chance, not that it reaches the published figures. Skipped with
a reason when ../shared/data is absent (the data is never part of the project).

    .venv/bin/pytest tests/real/test_real_training.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmer_dist.shards.pack import pack
from mmer_dist.train.__main__ import main as train_main

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MELD = DATA / "meld"
RAVDESS = DATA / "ravdess"
ORIGINAL = DATA / "ravdess-original" / "Actor_05"

needs_meld = pytest.mark.skipif(not (MELD / "train_sent_emo.csv").is_file(), reason=f"real MELD CSVs not found in {MELD}")
needs_ravdess = pytest.mark.skipif(not (RAVDESS / "Actor_20").is_dir(),
                                   reason=f"real RAVDESS speech (Actor_01..Actor_20) not found in {RAVDESS}")
needs_original = pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"RAVDESS originals not found in {ORIGINAL}")


def majority_macro_f1(counts: dict[str, int]) -> float:
    """Macro-F1 of always predicting the most frequent class: the floor a learning model must clear."""
    n, top = sum(counts.values()), max(counts.values())
    return 2 * top / (n + top) / len(counts)


def train(config: str, shards: Path, out: Path, *overrides: str) -> dict:
    assert train_main(["--config", config, "--shards", str(shards), "--out", str(out), *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


@needs_meld
def test_meld_text_minilm_learns(tmp_path: Path) -> None:
    """Real MELD train CSV -> text-only shards -> 100 steps of MiniLM -> dev (1,109 rows) well above chance."""
    res = pack("meld", MELD, tmp_path / "meld", progress=False)
    assert res.index is not None and res.index.splits["train"].num_samples == 9989
    dev_counts = dict(res.index.splits["dev"].class_counts)
    m = train("meld_text_minilm", tmp_path / "meld", tmp_path / "run",
              "data.batch_size=32", "data.max_text_tokens=32", "sampler.weighting=sqrt_inverse",
              "train.max_steps=100", "train.eval_every=100", "optim.warmup_steps=10", "train.log_every=50")
    floor = majority_macro_f1(dev_counts)                        # 0.085 on MELD dev
    assert m["split"] == "dev" and sum(v["support"] for v in m["per_class"].values()) == 1109
    assert m["macro_f1"] > max(0.25, 2.5 * floor), m            # measured 0.34 here; the full run 0.44 (benchmarks/README.md)
    assert m["weighted_f1"] > 0.45, m                           # measured 0.53
    # more than the majority class is predicted: at least 4 of the 7 classes get a non-zero F1
    assert sum(v["f1"] > 0 for v in m["per_class"].values()) >= 4, m["per_class"]


@needs_ravdess
def test_ravdess_audio_scratch_learns_speaker_independent(tmp_path: Path) -> None:
    """Real RAVDESS speech, actors 01-20, default actor split -> from-scratch audio encoder -> the dev
    actors (15-16, never seen in training) well above chance (8 classes: 12.5% accuracy)."""
    res = pack("ravdess", RAVDESS, tmp_path / "rav", workers=2, progress=False)
    assert res.index is not None
    sizes = {s: res.index.splits[s].num_samples for s in ("train", "dev", "test")}
    assert sizes == {"train": 840, "dev": 120, "test": 240}
    # The preset's model and lr, 300 steps of 32 on one process (the preset: 2,600 steps on two).
    # Dev accuracy is above chance from the first evaluation (0.28 at step 50) and ~0.49 at step 300.
    m = train("ravdess_audio", tmp_path / "rav", tmp_path / "run",
              "data.batch_size=32", "optim.warmup_steps=20", "train.max_steps=300", "train.eval_every=50",
              "train.log_every=50")
    assert m["split"] == "dev" and sum(v["support"] for v in m["per_class"].values()) == 120
    # measured 0.49 accuracy, 0.42 Macro-F1 (0.41 / 0.39 before the encoder's LayerNorm, all-band
    # normalisation and SpecAugment); chance: 0.125 and 0.03 (one class predicted)
    assert m["accuracy"] > 0.33 and m["macro_f1"] > 0.27, m


@needs_original
def test_real_originals_through_predict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A small 3-modality model trained on a synthetic RAVDESS-layout corpus predicts on a real 720p
    H.264/AAC original (its audio track), on the original 48 kHz wav, and on the video-only file."""
    from mmer_dist.cli import main as cli_main
    from mmer_dist.corpora.synthetic import write_corpus

    write_corpus("ravdess", tmp_path / "raw", n=96, seed=0)
    res = pack("ravdess", tmp_path / "raw", tmp_path / "shards", progress=False)
    assert res.index is not None
    run = tmp_path / "run"
    train("debug", tmp_path / "shards", run, "data.modalities=[text,audio,video]", "train.max_steps=4",
          "optim.warmup_steps=1")
    av_clip = next(ORIGINAL.glob("01-*.mp4"))
    wav = next(ORIGINAL.glob("03-*.wav"))
    video_only = next(ORIGINAL.glob("02-*.mp4"))
    for files in (["--video", str(av_clip)], ["--video", str(av_clip), "--audio", str(wav)],
                  ["--video", str(video_only)], ["--audio", str(wav)]):
        capsys.readouterr()
        assert cli_main(["predict", "--model", str(run), *files, "--json"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        labels = set(out["probabilities"])
        assert out["label"] in labels and abs(sum(out["probabilities"].values()) - 1) < 1e-4
        expected = {"audio", "video"} if files[0] == "--video" else {"audio"}
        assert set(out["modalities"]) == expected, (files, out)
