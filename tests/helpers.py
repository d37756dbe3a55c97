"""Helpers the tests (and benchmarks/models.py) share, kept out of the library: random batches, the
distributed eval sampler over `eval_indices`, the class mix a weighted draw should follow, padding
fractions, one-track media checks.

    from helpers import example_batch          # tests/ is on sys.path (conftest.py lives there)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from mmer_dist.data.sampler import eval_indices
from mmer_dist.models.encoders import lengths_to_mask
from mmer_dist.shards.media import MediaError, verify_tracks

MODALITIES = ("text", "audio", "video")


def example_batch(batch_size: int = 4, modalities: tuple[str, ...] = MODALITIES, *, text_len: int = 16,
                  audio_samples: int = 16000, frames: int = 4, image_size: int = 32, num_classes: int = 7,
                  vocab_size: int = 30522, generator: torch.Generator | None = None) -> dict[str, Any]:
    """A random batch in the collate format (random lengths, padding at the end) for tests and benchmarks."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    b = batch_size

    def lengths(full: int) -> Tensor:
        return torch.randint(max(1, full // 2), full + 1, (b,), generator=g)

    batch: dict[str, Any] = {"keys": [f"example-{i}" for i in range(b)],
                             "labels": torch.randint(0, num_classes, (b,), generator=g)}
    if "text" in modalities:
        mask = lengths_to_mask(lengths(text_len), text_len)
        ids = torch.randint(1000, vocab_size, (b, text_len), generator=g)
        batch["text_ids"], batch["text_mask"] = ids * mask, mask
    if "audio" in modalities:
        mask = lengths_to_mask(lengths(audio_samples), audio_samples)
        batch["audio"], batch["audio_mask"] = torch.randn(b, audio_samples, generator=g) * 0.1 * mask, mask
    if "video" in modalities:
        mask = lengths_to_mask(lengths(frames), frames)
        video = torch.randn(b, frames, 3, image_size, image_size, generator=g)
        batch["video"], batch["video_mask"] = video * mask[:, :, None, None, None], mask
    return batch


def expected_class_distribution(labels: Any, sample_w: Any, num_classes: int | None = None) -> np.ndarray:
    """P(class c) of one draw from `sample_w`: sum of the weights of class c over the total."""
    w = np.asarray(sample_w, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if y.size != w.size:
        raise ValueError(f"{y.size} labels but {w.size} sample weights")
    k = num_classes if num_classes is not None else int(y.max()) + 1
    mass = np.bincount(y, weights=w, minlength=k)
    return mass / mass.sum()



class DistributedEvalSampler(Sampler[int]):
    """Sampler over `eval_indices(n, num_replicas, rank)`; `.is_padding` aligns with what it yields."""

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.indices, self.is_padding = eval_indices(n, num_replicas, rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def num_padding(self) -> int:
        return int(self.is_padding.sum())


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[float]) -> float:
    """Share of padded positions when each batch is padded to its longest member."""
    total = real = 0.0
    for b in batches:
        if not b:
            continue
        longest = max(lengths[i] for i in b)
        total += longest * len(b)
        real += sum(lengths[i] for i in b)
    return 0.0 if total == 0 else 1.0 - real / total


def verify_media(path: str | Path, kind: str) -> float:
    """Duration of the first `kind` ("audio"|"video") track after `verify_tracks`, or `MediaError`."""
    got = verify_tracks(path, (kind,))[kind]
    if isinstance(got, MediaError):
        raise got
    return got
