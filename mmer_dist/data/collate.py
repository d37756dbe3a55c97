"""Collation: decoded samples -> one padded batch with per-modality masks; length bucketing.

    collate = Collator.for_tokenizer(cfg.data, tokenizer)      # tokenizer: None without text
    batch = collate([sample, Skipped(...), sample, ...])

The batch (model input), for the modalities in `cfg.data.modalities` only:

    "keys": list[str], "labels": LongTensor[B]
    "text_ids": LongTensor[B, Lt], "text_mask": BoolTensor[B, Lt]     True = real token
    "audio": FloatTensor[B, S], "audio_mask": BoolTensor[B, S]        True = real sample
    "video": FloatTensor[B, F, 3, H, W], "video_mask": BoolTensor[B, F]

or, from embedding shards (`mmer-dist embed`), per modality instead of its media keys:

    "text_emb": FloatTensor[B, T, D], "text_emb_mask": BoolTensor[B, T]   (T = 1 for pooled vectors)

plus bookkeeping the loop reads and the model ignores:

    "pad": BoolTensor[B]            True = an evaluation padding duplicate: drop it before metrics
    "index": LongTensor[B]          each sample's position in its split (-1 when the loader cannot tell)
    "skipped": dict[str, int]       samples of this batch that failed to decode, by reason
    "skipped_index": list[int]      their positions in the split (evaluation counts them as covered)
    "last_skip": str                where the last of them was and why (for a max_skip_fraction error)
    "fatal": list[str]              damaged data (a shard the index calls complete cannot be read): the
                                    rank loader raises `DataError` with these messages
    "degraded": dict[str, int]      kept samples with a present-but-empty modality, by reason

A sample lacking a modality gets zeros and an all-False mask row; when no sample of the batch
has it, the padded length is 1 (text, audio) so shapes stay valid. Skipped samples are dropped,
not replaced: the batch gets smaller (possibly empty, B = 0) but the number of batches per rank
never changes -- equal steps per rank matter more than equal batch sizes.

Length bucketing (`bucket_batches`) groups indices of similar audio duration into a batch,
within windows of consecutive draws, then shuffles the batch order, so padding shrinks while
the epoch's sample set and its batch count stay exactly those of the unbucketed order.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Sequence

import torch

from mmer_dist.config import DataConfig
from mmer_dist.data.decode import Skipped


def _pad_rows(rows: list[torch.Tensor | None], dtype: torch.dtype, pad_value: float | int,
            tail: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack rows [L_i, *tail] into [B, max L, *tail] filled with `pad_value`, and the [B, max L] mask of real rows.

    A None row (modality absent) is all padding; with no row at all, max L is 1 so shapes stay valid.
    """
    length = max([r.shape[0] for r in rows if r is not None] + [1])
    out = torch.full((len(rows), length, *tail), pad_value, dtype=dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r is not None and r.shape[0] > 0:
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
    return out, mask


def collate_embeddings(samples: list[dict[str, Any]], modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """`{m}_emb` [B, T, D] float32 + `{m}_emb_mask` [B, T] for the modalities whose samples carry features."""
    out: dict[str, torch.Tensor] = {}
    for m in modalities:
        rows = [s.get(f"{m}_emb") for s in samples]
        widths = {int(r.shape[1]) for r in rows if r is not None}
        if len(widths) > 1:
            raise ValueError(f"{m} features of different widths {sorted(widths)} in one batch: the shards mix "
                             f"embeddings of several encoders; re-run `mmer-dist embed` into a fresh folder")
        width = widths.pop() if widths else 1
        out[f"{m}_emb"], out[f"{m}_emb_mask"] = _pad_rows(rows, torch.float32, 0.0, tail=(width,))
    return out


class Collator:
    """Picklable collate_fn for DataLoader / `wds.batched` over samples and `Skipped` markers."""

    def __init__(self, cfg_data: DataConfig, pad_id: int = 0) -> None:
        self.modalities = tuple(cfg_data.modalities)
        self.frames = cfg_data.video_frames
        self.size = cfg_data.video_size
        self.pad_id = int(pad_id or 0)

    @classmethod
    def for_tokenizer(cls, cfg_data: DataConfig, tokenizer: Any) -> "Collator":
        """The collator padding text with `tokenizer`'s pad id (0 when there is no tokenizer or pad token)."""
        return cls(cfg_data, pad_id=getattr(tokenizer, "pad_token_id", 0) or 0)

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        samples = [s for s in items if isinstance(s, dict)]
        skips = [s for s in items if isinstance(s, Skipped) and not s.pad and not s.fatal]
        degraded = Counter(r for s in samples for r in s.get("degraded", ()))
        batch: dict[str, Any] = {
            "keys": [s["key"] for s in samples],
            "labels": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
            "pad": torch.tensor([bool(s.get("pad", False)) for s in samples], dtype=torch.bool),
            "index": torch.tensor([int(s.get("index", -1)) for s in samples], dtype=torch.long),
            "skipped": dict(Counter(s.reason for s in skips)),
            "skipped_index": [s.index for s in skips],
            "last_skip": f"{skips[-1].key}: {skips[-1].reason} ({skips[-1].detail})" if skips else "",
            "fatal": [s.detail for s in items if isinstance(s, Skipped) and s.fatal],
            "degraded": dict(degraded),
        }
        # embedding shards: a modality whose samples carry `{m}_emb` gets features instead of media keys
        embedded = [m for m in self.modalities if any(f"{m}_emb" in s for s in samples)]
        batch.update(collate_embeddings(samples, embedded))
        if "text" in self.modalities and "text" not in embedded:
            batch["text_ids"], batch["text_mask"] = _pad_rows([s.get("text_ids") for s in samples], torch.long, self.pad_id)
        if "audio" in self.modalities and "audio" not in embedded:
            batch["audio"], batch["audio_mask"] = _pad_rows([s.get("audio") for s in samples], torch.float32, 0.0)
        if "video" in self.modalities and "video" not in embedded:
            video = torch.zeros((len(samples), self.frames, 3, self.size, self.size), dtype=torch.float32)
            vmask = torch.zeros((len(samples), self.frames), dtype=torch.bool)
            for i, s in enumerate(samples):
                v = s.get("video")
                if v is None:
                    continue
                if tuple(v.shape[1:]) != (3, self.size, self.size) or v.shape[0] > self.frames:
                    raise ValueError(f"sample {s['key']}: video shape {tuple(v.shape)} does not fit "
                                     f"[<= {self.frames}, 3, {self.size}, {self.size}] (data.video_frames/video_size); "
                                     f"the decoder and the collator must use the same cfg.data")
                video[i, : v.shape[0]] = v
                vmask[i, : v.shape[0]] = True
            batch["video"], batch["video_mask"] = video, vmask
        return batch


def bucket_batches(indices: Sequence[int], lengths: Sequence[float], batch_size: int,
                   window_batches: int = 32, seed: int = 0, drop_last: bool = True) -> list[list[int]]:
    """Cut `indices` (a rank's draw, in order) into floor(n / batch_size) batches of similar length
    (ceil with drop_last=False: the last one may be partial).

    The tail that drop_last would drop is dropped first (same samples as without bucketing);
    every window of `window_batches` batches is sorted by `lengths[index]` and cut into batches;
    the batch order is then shuffled with `seed` so training is not a length curriculum.
    Deterministic in (indices, lengths, batch_size, window_batches, seed).
    """
    if batch_size < 1 or window_batches < 1:
        raise ValueError(f"bucket_batches: batch_size={batch_size} and window_batches={window_batches} must be >= 1")
    n_batches = len(indices) // batch_size if drop_last else math.ceil(len(indices) / batch_size)
    kept = list(indices[: n_batches * batch_size])
    window = window_batches * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(kept), window):
        chunk = sorted(kept[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    random.Random(seed).shuffle(batches)
    return batches
