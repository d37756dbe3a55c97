"""Class balance as a stream stage: the output labels follow a target distribution, whatever the input mix.

    stage = ClassBalancedStream(target, seed=s, rank=r)       # target: class probabilities
    pipeline.append(stage)                                    # a WebDataset stage, or call it on any iterator

The streaming loader (mmer_dist.data.stream_loader) puts it after the shuffle buffer when
`sampler.weighting` is not `none`, with the class mix the map-style weighted sampler draws
(`mmer_dist.weighting.class_target_distribution`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Iterator

import numpy as np
import torch

from mmer_dist.data.seeds import mix


def _default_label(item: Any) -> int:
    if isinstance(item, Mapping):
        for key in ("label_id", "label", "labels"):
            if key in item:
                value = item[key]
                if isinstance(value, str):
                    raise ValueError(f"sample {item.get('__key__', '?')!r}: {key}={value!r} is a label name, not an "
                                     "id; pass label_of=lambda s: labels.index(s['label']) or keep label_id")
                return int(value.item() if isinstance(value, torch.Tensor) else value)
        raise KeyError(f"sample {item.get('__key__', '?')!r} has no label_id/label field; pass label_of=...")
    return int(item[1])


class ClassBalancedStream:
    """A stream stage whose output labels follow `target` (class probabilities), whatever the input mix.

    Per-class buffers mixed by the target: for each output, draw a class c ~ target, then pull
    items from the source (buffering each under its label) until class c's buffer holds one, and
    emit a random item of it. So every output's label is c with probability exactly target_c, with
    no knowledge of the source distribution; items are emitted at most once. Each buffer holds at
    most `buffer_size` items; an item arriving at a full buffer replaces a random one there and the
    replaced item is counted as dropped (majority classes are thinned, not repeated: pair this with
    an endless, resampled shard stream). A finite source ends the balanced stream the first time the
    drawn class has nothing buffered and the source is exhausted (left-overs counted as dropped).

    Use as a WebDataset stage (`pipeline.append(ClassBalancedStream(p, seed=s))`) or call it on any
    iterator. Items pass through unchanged; the label comes from `label_of(item)` (default: item[1]
    of a tuple, or item["label_id"] / item["label"] of a dict). The random stream is seeded from
    (seed, rank, DataLoader worker id, epoch), so workers and ranks draw differently (the rank is
    handed in, like every other stage's); call set_epoch() for a new stream each epoch. Tolerance: the output class frequencies of N items
    are multinomial(N, target): |freq_c - target_c| <= 5 * sqrt(target_c (1 - target_c) / N).

    `stats` (per worker process) counts pulled, emitted and dropped items per class.
    """

    def __init__(self, target: Sequence[float] | np.ndarray, *, label_of: Callable[[Any], int] | None = None,
                 buffer_size: int = 64, seed: int = 0, rank: int = 0, patience: int = 100_000) -> None:
        p = np.asarray(target, dtype=np.float64)
        if p.ndim != 1 or p.size == 0 or not np.isfinite(p).all() or (p < 0).any() or not p.sum() > 0:
            raise ValueError(f"target class probabilities must be a non-empty 1-D list of finite numbers >= 0 "
                             f"with a positive sum, got {np.asarray(target).tolist()}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be >= 1")
        self.target = p / p.sum()
        self.label_of = label_of or _default_label
        self.buffer_size = int(buffer_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.patience = int(patience)
        self.epoch = 0
        k = self.target.size
        self.stats: dict[str, np.ndarray] = {"pulled": np.zeros(k, np.int64), "emitted": np.zeros(k, np.int64),
                                             "dropped": np.zeros(k, np.int64)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        return np.random.default_rng(mix(self.seed, self.rank, worker, self.epoch))

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        rng = self._rng()
        k = self.target.size
        buffers: list[list[Any]] = [[] for _ in range(k)]
        it = iter(source)
        cum = np.cumsum(self.target)
        stats = self.stats

        def draw() -> int:
            return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), k - 1)

        while True:
            c = draw()
            while self.target[c] == 0:     # guard against rounding onto a zero-probability class
                c = draw()
            waited = 0
            while not buffers[c]:
                try:
                    item = next(it)
                except StopIteration:
                    for label, buf in enumerate(buffers):
                        stats["dropped"][label] += len(buf)
                    return
                label = self.label_of(item)
                if not 0 <= label < k:
                    raise ValueError(f"stream item with label id {label}, outside [0, {k}) of the target "
                                     f"({k} classes); the target and the shards disagree on the label set")
                stats["pulled"][label] += 1
                buf = buffers[label]
                if len(buf) < self.buffer_size:
                    buf.append(item)
                else:
                    buf[int(rng.integers(len(buf)))] = item
                    stats["dropped"][label] += 1
                waited += 1
                if waited > self.patience and not buffers[c]:
                    raise RuntimeError(f"class {c} has target probability {self.target[c]:.4g} but none of the "
                                       f"last {waited} stream items has it; give it target 0 or check the shards")
            buf = buffers[c]
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            stats["emitted"][c] += 1
            yield buf.pop()
