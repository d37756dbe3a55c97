"""Helpers the tests (and benchmarks/models.py) share, kept out of the library: random batches, the
distributed eval sampler over `eval_indices`, the class mix a weighted draw should follow, padding
fractions, one-track media checks, a word tokenizer, tiny shard folders written with the packer's writer.

    from helpers import example_batch          # tests/ is on sys.path (conftest.py lives there)
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from torch.utils.data import Sampler

from mmer_dist.data.sampler import eval_indices
from mmer_dist.models.encoders import lengths_to_mask
from mmer_dist.shards.media import MediaError, verify_tracks
from mmer_dist.shards.merge import merge_stats, write_index
from mmer_dist.shards.schema import SampleEntry, ShardStats, shard_name, stats_name, write_json_atomic
from mmer_dist.shards.writer import TarSampleWriter, member_offsets

MODALITIES = ("text", "audio", "video")
LABELS = ["neutral", "joy", "anger"]        # the tiny shards' label set


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


class WordTokenizer:
    """A real (if tiny) tokenizer with the HF call convention: one id per word, [CLS]=1 ... [SEP]=2."""

    pad_token_id = 0

    def __call__(self, text: str, truncation: bool = True, max_length: int = 512) -> dict:
        ids = [1] + [3 + (sum(map(ord, w)) % 1000) for w in text.split()] + [2]
        if truncation and len(ids) > max_length:
            ids = ids[: max_length - 1] + [2]
        return {"input_ids": ids}


def flac(seconds: float, sr: int = 16000, seed: int = 0) -> bytes:
    x = (np.random.default_rng(seed).standard_normal(int(sr * seconds)) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="FLAC")
    return buf.getvalue()


def write_shards(root: Path, splits: dict[str, list[dict]], per_shard: int, corpus: str = "tiny") -> Path:
    """samples: {key, label_id, members{ext: bytes}, duration}; writes tars, stats, then the index (the merge)."""
    root.mkdir(parents=True, exist_ok=True)
    plan = []
    for split, samples in splits.items():
        for s_i, lo in enumerate(range(0, len(samples), per_shard)):
            chunk = samples[lo : lo + per_shard]
            name = shard_name(corpus, split, s_i)
            with open(root / name, "wb") as f:
                w = TarSampleWriter(f)
                for s in chunk:
                    w.write(s["key"], s["members"])
                w.close()
            offs = member_offsets(root / name)
            counts = Counter(LABELS[s["label_id"]] for s in chunk)
            stats = ShardStats(shard=name, split=split, bytes=(root / name).stat().st_size,
                               samples=[SampleEntry(s["key"], s["label_id"], offs[s["key"]], s["duration"], "spk", -1)
                                        for s in chunk],
                               class_counts=dict(counts), duration=sum(s["duration"] for s in chunk),
                               modalities=dict(Counter(m for s in chunk for m, ext in (("text", "txt"), ("audio", "flac"))
                                                       if ext in s["members"])))
            write_json_atomic(root / stats_name(name), stats.to_json())
            plan.append((split, name))
    merged = merge_stats(root, plan, LABELS)
    write_index(root, merged.index(corpus, "train", "utterance", {}), merged.samples)
    return root


def make_samples(split: str, n: int, seed: int = 0, corrupt: tuple[int, ...] = (), no_audio: tuple[int, ...] = ()) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(i % 7 == 0) + int(i % 5 == 0)          # imbalanced: mostly neutral
        dur = float(rng.choice([0.1, 0.2, 0.3, 0.5]))
        key = f"{split}_{i:04d}"
        members = {"json": json.dumps({"label": LABELS[label], "label_id": label}).encode(),
                   "txt": f"utterance {i} says {LABELS[label]}".encode()}
        if i in corrupt:
            members["flac"] = b"fLaC" + bytes(40)
        elif i not in no_audio:
            members["flac"] = flac(dur, seed=i)
        out.append({"key": key, "label_id": label, "members": members, "duration": dur if i not in no_audio else 0.0})
    return out


# --------------------------------------------------------------------------- runs of the real entry points


def train_overrides(*extra: str) -> list[str]:
    """The smoke tests' debug training: text + audio, dropout off (so runs with different process counts
    compute the same losses), a line per step."""
    return ["data.modalities=[text,audio]", "model.fusion.dropout=0.0", "model.text.dropout=0.0",
            "model.audio.dropout=0.0", "train.log_every=1",
            "optim.warmup_steps=2", "data.batch_size=8", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess run: one thread, unbuffered, plus `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


def torchrun(nproc: int, args: list[str], module: str = "mmer_dist.train") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", module, *args]


def log_records(run: Path, split: str | None = "train") -> list[dict]:
    """The run's log.jsonl step records of `split` (its loss or metrics; None: every record, the epoch ends
    `{"epoch_end", "samples", "digest"}` included)."""
    records = list(map(json.loads, (run / "log.jsonl").read_text().splitlines()))
    return [r for r in records if split is None or (r.get("split") == split and "epoch_end" not in r)]
