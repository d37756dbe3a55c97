"""Collation: padding and masks per modality, missing modalities, skip/degrade counts, length bucketing."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmer_dist.config import DataConfig
from helpers import padding_fraction
from mmer_dist.data.collate import Collator, bucket_batches
from mmer_dist.data.decode import Skipped

CFG = DataConfig(video_frames=3, video_size=8)


def sample(key: str, label: int, text: int | None, audio: int | None, video: int | None, **extra) -> dict:
    return {
        "key": key, "label": label, "degraded": extra.pop("degraded", []),
        "text_ids": None if text is None else torch.arange(1, text + 1),
        "audio": None if audio is None else torch.full((audio,), 0.5),
        "video": None if video is None else torch.ones(video, 3, 8, 8),
        **extra,
    }


def test_padding_and_masks_per_modality():
    batch = Collator(CFG, pad_id=7)([sample("a", 1, 3, 5, 3), sample("b", 2, 1, 2, None), sample("c", 0, None, None, 3)])
    assert batch["keys"] == ["a", "b", "c"] and batch["labels"].tolist() == [1, 2, 0]
    assert batch["text_ids"].shape == (3, 3) and batch["text_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert batch["text_ids"][1].tolist() == [1, 7, 7] and batch["text_ids"][2].tolist() == [7, 7, 7]
    assert batch["audio"].shape == (3, 5) and batch["audio_mask"].sum(1).tolist() == [5, 2, 0]
    assert batch["audio"][1, 2:].abs().sum() == 0 and batch["audio"][2].abs().sum() == 0
    assert batch["video"].shape == (3, 3, 3, 8, 8) and batch["video_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 1]]
    assert batch["video"][1].abs().sum() == 0
    assert batch["text_mask"].dtype == batch["audio_mask"].dtype == batch["video_mask"].dtype == torch.bool
    assert batch["pad"].tolist() == [False, False, False]


def test_modality_missing_from_whole_batch_and_unrequested():
    batch = Collator(CFG)([sample("a", 0, None, None, None), sample("b", 1, None, None, None)])
    assert batch["text_ids"].shape == (2, 1) and not batch["text_mask"].any()
    assert batch["audio"].shape == (2, 1) and not batch["audio_mask"].any()
    assert not batch["video_mask"].any()
    text_only = Collator(DataConfig(modalities=("text",)))([sample("a", 0, 2, 4, None)])
    assert "audio" not in text_only and "video" not in text_only and "audio_mask" not in text_only


def test_skips_dropped_and_counted_pad_flags_kept():
    items = [sample("a", 0, 2, 3, None, degraded=["audio_empty"]), Skipped("x", "audio_corrupt"),
             sample("b", 1, 2, 3, None, pad=True), Skipped("y", "video_corrupt"), Skipped("z", "audio_corrupt"),
             Skipped("p", "audio_corrupt", pad=True)]
    batch = Collator(CFG)(items)
    assert batch["keys"] == ["a", "b"] and batch["pad"].tolist() == [False, True]
    assert batch["skipped"] == {"audio_corrupt": 2, "video_corrupt": 1}      # padding duplicates not counted
    assert batch["degraded"] == {"audio_empty": 1}
    empty = Collator(CFG)([Skipped("x", "meta_corrupt")])
    assert empty["labels"].shape == (0,) and empty["audio"].shape == (0, 1) and empty["video"].shape == (0, 3, 3, 8, 8)


def test_wrong_video_shape_is_a_clear_error():
    bad = sample("a", 0, None, None, None)
    bad["video"] = torch.zeros(3, 3, 16, 16)
    with pytest.raises(ValueError, match="video_size"):
        Collator(CFG)([bad])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), b=st.integers(1, 9), window=st.integers(1, 6), seed=st.integers(0, 5))
def test_bucket_batches_keeps_samples_and_batch_count(n, b, window, seed):
    rng = random.Random(seed)
    indices = [rng.randrange(50) for _ in range(n)]
    lengths = [rng.random() for _ in range(50)]
    batches = bucket_batches(indices, lengths, b, window, seed)
    assert len(batches) == n // b and all(len(x) == b for x in batches)
    assert sorted(sum(batches, [])) == sorted(indices[: (n // b) * b])
    assert batches == bucket_batches(indices, lengths, b, window, seed)


def test_bucketing_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.uniform(0.5, 8.0) for _ in range(400)]
    order = list(range(400))
    rng.shuffle(order)
    plain = [order[i : i + 8] for i in range(0, 400, 8)]
    assert padding_fraction(bucket_batches(order, lengths, 8, 16), lengths) < 0.5 * padding_fraction(plain, lengths)
