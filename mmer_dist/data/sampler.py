"""The distributed weighted sampler and the eval split's division over ranks.

Training (the map-style loader, mmer_dist.data.map_loader, builds it from the index):

    cw = class_weights(counts, "inverse")                     # mmer_dist.weighting, per class
    sampler = DistributedWeightedSampler(sample_weights(labels, cw), seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=B, sampler=sampler, num_workers=W)
    for epoch in ...:
        sampler.set_epoch(epoch)
        for batch in loader:
            ...train...
            sampler.advance(B)              # what the loop consumed, NOT what __iter__ yielded
            state = sampler.state_dict()    # a fresh sampler that loads it yields exactly the rest

Evaluation: `eval_indices(n, num_replicas, rank)` (equal length per rank, padding flagged so metrics
drop it). Streaming: `ClassBalancedStream` (mmer_dist.data.balance, a WebDataset stage) reaches the
same class mix, `mmer_dist.weighting.class_target_distribution(counts, class_weights(...))`.

The global draw. Every rank derives the same sequence of `total = num_samples * num_replicas`
dataset indices from (seed, epoch) and keeps the global positions `rank, rank + R, rank + 2R, ...`
(strided). Strided, because then global batch k (the k-th local batch of every rank, together) is
exactly the contiguous chunk k of the global draw, whatever R is: the same data order as one
process with an R-times larger batch. Random numbers come from `torch.Generator`s seeded with a
mix of (seed, epoch, block) for fixed blocks of 2**20 numbers, so the draw is defined independently
of how it is computed and a rank never materialises more than one block of the other ranks' share.

* replacement=True: position p gets index F^-1(U_p), the inverse CDF of `weights` at a uniform
  U_p, i.e. i.i.d. draws with P(i) = w_i / sum(w) (the distribution of torch.multinomial; the union
  over ranks follows `weights`). A rank looks up its uniforms in sorted order, so its binary
  searches walk the CDF forwards (8x faster than random-order lookups at 10M weights).
* replacement=False: a weighted random permutation of the items with w_i > 0 (Efraimidis-Spirakis:
  order by the exponential race E_i / w_i, E_i ~ Exp(1)); weights shape the order, every drawable
  item appears once per pass. The keys are packed with the item index into one uint64 and sorted
  in place (0.75 s instead of 1.6 s for an argsort at 10M items, and no index array): keys keep
  64 - ceil(log2 n) bits (39 at 10M items, a relative resolution of ~4e-9), equal keys are ordered
  by index — a negligible bias. All-equal weights use torch.randperm (a uniform permutation).
  When `total` exceeds the m drawable items the permutation is repeated (wrapped) to fill it:
  global positions p >= m are padding duplicates (`num_padding`, `rank_padding`); when it is
  smaller, the last m - total items of the order are not drawn this epoch.

Mid-epoch resume. DataLoader workers prefetch ahead (2 x num_workers batches by default), so the
number of indices `__iter__` has handed out is more than the training loop has consumed; saving
that would skip the prefetched-but-unused samples on resume. The sampler therefore keeps a
`position` counter that only the loop moves, with `advance(n)` after each batch it trained on
(or `seek(n)` to set it absolutely, e.g. batches_done * batch_size). `advance` clamps at the end of
the epoch, so the loop may call `advance(batch_size)` for the short last batch too; a batch that
lost samples to decode failures still consumed batch_size indices. A loop that never advances
resumes at the start of the epoch (it repeats, it never skips). The state is rank-independent
(every rank is at the same position by construction), so a checkpoint may keep rank 0's state.

Elastic resume. The draw at a global position does not depend on the number of ranks, so the state
is a position in one global draw: the layout (first position, end) plus the positions consumed per
rank. Loaded by a sampler with another number of ranks, the epoch continues at the global position
reached (start + position x R) up to the saved end, the remaining positions strided over the new
ranks: none repeated, none dropped. Ranks then own sizes that may differ by one; the loader keeps
the number of batches equal (see mmer_dist.data.map_loader).

Scale (benchmarks/sampler.py, 10M weights): one epoch is planned per rank in well under 2 s with
O(n) float64 working memory (the CDF or the packed keys, 80 MB at 10M) plus the rank's share.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from mmer_dist import dist
from mmer_dist.data.seeds import mix

__all__ = ["DistributedWeightedSampler", "eval_indices"]

_BLOCK = 1 << 20            # random numbers per seeded generator block (part of the draw's definition)
_STATE_FORMAT = "mmer_dist.DistributedWeightedSampler/2"
_STATE_FORMAT_V1 = "mmer_dist.DistributedWeightedSampler/1"     # checkpoints of earlier versions still load


# --------------------------------------------------------------------------- random numbers

def _uniform_block(seed: int, epoch: int, stream: int, block: int, length: int) -> np.ndarray:
    """Uniforms in [0, 1) of block `block` of a stream: a torch.Generator seeded by the tuple."""
    g = torch.Generator().manual_seed(mix(seed, epoch, stream, block))
    return torch.rand(length, generator=g, dtype=torch.float64).numpy()


_STREAM_WITH = 1          # uniforms indexed by global position (replacement=True)
_STREAM_WITHOUT = 2       # uniforms indexed by item (replacement=False keys)
_STREAM_PERM = 3          # torch.randperm seed (replacement=False, all weights equal)


# --------------------------------------------------------------------------- validation

def _as_weights(weights: Any) -> np.ndarray:
    """Per-sample weights as a 1-D float64 array, refusing empty / NaN / inf / negative / all-zero."""
    if isinstance(weights, torch.Tensor):
        arr = weights.detach().cpu().numpy()
    else:
        arr = np.asarray(weights)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"weights must be numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"weights must be 1-D (one weight per dataset sample), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("weights is empty: the dataset split has no samples (check the split name and the index)")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"weights[{i}] = {arr[i]}: weights must be finite ({int(bad.sum())} NaN/inf in total)")
    neg = arr < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise ValueError(f"weights[{i}] = {arr[i]}: weights must be >= 0 ({int(neg.sum())} negative in total)")
    if not (arr > 0).any():
        raise ValueError(f"all {arr.size} weights are zero: nothing can be drawn "
                         "(a class weight of 0 for every class present? check sampler.class_weights)")
    return arr


def _check_world(num_replicas: int, rank: int) -> None:
    if num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")


# --------------------------------------------------------------------------- training sampler

class DistributedWeightedSampler(Sampler[int]):
    """Dataset indices for this rank: its strided share of one global weighted draw per (seed, epoch).

    Args:
        weights: one non-negative weight per dataset sample (list, ndarray or tensor; not all zero).
        num_replicas: number of ranks (default: `mmer_dist.dist.world_size()`).
        rank: this rank (default: `mmer_dist.dist.rank()`).
        num_samples: indices per rank per epoch (default: ceil(len(weights) / num_replicas) with
            replacement, ceil(#positive weights / num_replicas) without, i.e. one pass).
        epoch_batch: when > 0, an epoch draws only num_samples // epoch_batch whole batches per rank
            (what a drop_last loader consumes); the draw itself is unchanged.
        seed: seed of the global draw; the same on every rank.
        replacement: i.i.d. draws following `weights` (True) or a weighted permutation (False).

    Every rank yields exactly `num_samples` indices per epoch (fewer after a mid-epoch resume:
    the rest). See the module docstring for the draw and the `advance`/`state_dict` protocol.
    """

    def __init__(self, weights: Any, num_replicas: int | None = None, rank: int | None = None,
                 num_samples: int | None = None, seed: int = 0, replacement: bool = True,
                 epoch_batch: int = 0) -> None:
        self.weights = _as_weights(weights)
        self.num_replicas = dist.world_size() if num_replicas is None else int(num_replicas)
        self.rank = dist.rank() if rank is None else int(rank)
        _check_world(self.num_replicas, self.rank)
        self.replacement = bool(replacement)
        self.seed = int(seed)
        self.num_drawable = int(np.count_nonzero(self.weights))
        if num_samples is None:
            base = self.weights.size if self.replacement else self.num_drawable
            num_samples = math.ceil(base / self.num_replicas)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1 (indices per rank per epoch)")
        self.num_samples = int(num_samples)
        self.total_size = self.num_samples * self.num_replicas
        # epoch_batch > 0: an epoch uses only the positions of whole batches per rank (a loader's drop_last)
        used = self.num_samples // epoch_batch * epoch_batch if epoch_batch > 0 else self.num_samples
        self.epoch_positions = used * self.num_replicas
        self.epoch = 0
        # The layout: this rank owns global positions start + rank + R*t below `end`. A fresh epoch starts at 0
        # and ends at total_size; an epoch resumed on another number of ranks continues at the saved global
        # position up to the saved end (the remaining positions re-divided: none repeated, none dropped).
        self._layout = (0, self.epoch_positions)
        self._position = 0          # positions of this layout consumed by the training loop (this rank)
        self._start = 0             # position when the current/last iteration began (for __len__)
        self._fingerprint: str | None = None
        self._plan_cache: tuple[tuple[int, int, int], np.ndarray] | None = None

    # ---- epoch, layout and position

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draw. A new epoch starts at position 0; the current epoch keeps its
        position (so the usual `set_epoch(epoch)` at the top of a resumed epoch keeps the resume)."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self.epoch:
            self.epoch, self._position, self._start = epoch, 0, 0
            self._layout = (0, self.epoch_positions)

    @property
    def layout(self) -> tuple[int, int]:
        """(first global position, end) of the positions this epoch still divides over the ranks."""
        return self._layout

    def rank_size(self, rank: int | None = None) -> int:
        """Positions `rank` (default: this rank) owns in the current layout."""
        start, end = self._layout
        r = self.rank if rank is None else rank
        return max(0, math.ceil((end - start - r) / self.num_replicas))

    @property
    def position(self) -> int:
        """Indices of the current epoch this rank's training loop has consumed."""
        return self._position

    @property
    def global_position(self) -> int:
        """Global positions of the epoch consumed by all ranks together (every rank at `position`)."""
        start, end = self._layout
        return min(end, start + self._position * self.num_replicas)

    def advance(self, n: int) -> int:
        """Record that the loop consumed `n` more indices (clamped at the epoch's end); returns the position."""
        if n < 0:
            raise ValueError(f"advance(n={n}): n must be >= 0")
        self._position = min(self.rank_size(), self._position + int(n))
        return self._position

    def seek(self, position: int) -> None:
        """Set the consumed count of the current epoch absolutely (e.g. batches_done * batch_size)."""
        if not 0 <= position <= self.rank_size():
            raise ValueError(f"seek({position}): position must be in [0, {self.rank_size()}] (this rank's share)")
        self._position = self._start = int(position)

    # ---- padding bookkeeping (replacement=False only; with replacement every draw is i.i.d.)

    @property
    def num_padding(self) -> int:
        """Global positions of an epoch that repeat an earlier item to fill `total_size` (wrap padding)."""
        return 0 if self.replacement else max(0, self.total_size - self.num_drawable)

    @property
    def rank_padding(self) -> int:
        """How many of this rank's `num_samples` positions are padding duplicates."""
        return int(self.is_padding().sum())

    def is_padding(self) -> np.ndarray:
        """Bool mask over this rank's positions of the current layout: True = a wrap-padding duplicate."""
        pos = self.rank_positions()
        return np.zeros(pos.size, dtype=bool) if self.replacement else pos >= self.num_drawable

    # ---- the draw

    def rank_positions(self, rank: int | None = None) -> np.ndarray:
        """The global positions `rank` (default: this rank) owns in the current layout, ascending."""
        start, _ = self._layout
        r = self.rank if rank is None else rank
        return start + r + self.num_replicas * np.arange(self.rank_size(r), dtype=np.int64)

    def draw(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices at ascending global `positions` of the epoch's draw (the same whatever R is)."""
        if self.replacement:
            return self._draw_with_replacement(positions)
        order = self._global_order_without()
        return order[positions % order.size]

    def _draw_with_replacement(self, positions: np.ndarray) -> np.ndarray:
        w = self.weights
        cdf = np.cumsum(w)
        total_w = cdf[-1]
        last_positive = w.size - 1 - int(np.argmax(w[::-1] > 0))
        # Gather the uniforms of `positions` block by block, never the whole stream. A block is generated up to
        # the last position it needs: torch.rand(n) of a seeded CPU generator is the first n of torch.rand(m > n)
        # (checked on torch 2.11, and by tests/unit/test_sampler.py), so the value at a position does not depend
        # on how far the draw goes, e.g. on the number of ranks of an elastic resume.
        u = np.empty(positions.size, dtype=np.float64)
        end = int(positions[-1]) + 1 if positions.size else 0
        bounds = np.searchsorted(positions, np.arange(0, end + _BLOCK, _BLOCK))
        for block in range(math.ceil(end / _BLOCK)):
            lo, hi = int(bounds[block]), int(bounds[block + 1])
            if lo == hi:
                continue
            first = block * _BLOCK
            length = int(positions[hi - 1]) - first + 1
            u[lo:hi] = _uniform_block(self.seed, self.epoch, _STREAM_WITH, block, length)[positions[lo:hi] - first]
        order = np.argsort(u, kind="stable")
        targets = u[order]
        targets *= total_w
        found = np.searchsorted(cdf, targets, side="right")   # sorted queries: forward walk over the CDF
        del cdf, targets
        np.minimum(found, last_positive, out=found)           # u * W rounding up to W
        out = np.empty(positions.size, dtype=np.int64)
        out[order] = found
        return out

    def _global_order_without(self) -> np.ndarray:
        """The epoch's weighted permutation of the drawable items (length num_drawable)."""
        w = self.weights
        n, m = w.size, self.num_drawable
        if m == n and w.min() == w.max():
            g = torch.Generator().manual_seed(mix(self.seed, self.epoch, _STREAM_PERM, 0))
            return torch.randperm(n, generator=g).numpy()
        idx_bits = max(1, (n - 1).bit_length())
        packed = np.empty(n, dtype=np.uint64)
        keys = packed.view(np.float64)
        for block in range(math.ceil(n / _BLOCK)):
            lo, hi = block * _BLOCK, min((block + 1) * _BLOCK, n)
            u = _uniform_block(self.seed, self.epoch, _STREAM_WITHOUT, block, hi - lo)
            with np.errstate(divide="ignore"):
                np.divide(-np.log1p(-u), w[lo:hi], out=keys[lo:hi])       # E_i / w_i; w_i = 0 -> +inf
            keys[lo:hi] += 0.0                                                # -0.0 -> +0.0 (sign bit)
            # Positive floats order like their bit patterns: keep the top bits, put the index below.
            seg = packed[lo:hi]
            seg >>= np.uint64(idx_bits)
            seg <<= np.uint64(idx_bits)
            seg |= np.arange(lo, hi, dtype=np.uint64)
        packed.sort()
        order = packed[:m]
        order &= np.uint64((1 << idx_bits) - 1)
        return order.view(np.int64)

    def local_indices(self) -> np.ndarray:
        """This rank's dataset indices in the current layout (int64), computed once per epoch and layout."""
        key = (self.epoch, *self._layout)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = None
            self._plan_cache = (key, self.draw(self.rank_positions()))
        return self._plan_cache[1]

    def global_indices(self) -> np.ndarray:
        """The whole global draw of the epoch (total_size long); rank r's share is `[r::num_replicas]`.
        For tests and tools: it costs num_replicas times a rank's plan."""
        return self.draw(np.arange(self.total_size, dtype=np.int64))

    def __iter__(self) -> Iterator[int]:
        plan = self.local_indices()
        self._start = start = self._position
        # Lazily, in chunks: never a Python list of the whole epoch.
        for lo in range(start, plan.size, 8192):
            yield from plan[lo:min(lo + 8192, plan.size)].tolist()

    def __len__(self) -> int:
        """Indices the next/current iteration yields: this rank's share minus the position it starts at."""
        return self.rank_size() - self._start

    # ---- checkpointing

    def fingerprint(self) -> str:
        """Cheap identity of the weights (count, positives, CRC32 of the float64 bytes)."""
        if self._fingerprint is None:
            crc = zlib.crc32(memoryview(self.weights).cast("B"))
            self._fingerprint = f"n={self.weights.size}:pos={self.num_drawable}:crc32={crc:08x}"
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """Epoch, the layout and the consumed position, and the identity of the draw; json-serialisable."""
        return {
            "format": _STATE_FORMAT,
            "epoch": self.epoch,
            "seed": self.seed,
            "position": self._position,
            "layout": list(self._layout),
            "global_position": self.global_position,
            "num_replicas": self.num_replicas,
            "num_samples": self.num_samples,
            "replacement": self.replacement,
            "weights_fingerprint": self.fingerprint(),
            "rank": self.rank,          # informational: positions are equal on every rank
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved epoch: at the saved position with the same number of ranks, or with the
        positions left of it re-divided over this run's ranks. Refuses a state from a different draw."""
        if not isinstance(state, Mapping) or state.get("format") not in (_STATE_FORMAT, _STATE_FORMAT_V1):
            raise ValueError(f"not a DistributedWeightedSampler state (expected format {_STATE_FORMAT!r}, "
                             f"got {state.get('format') if isinstance(state, Mapping) else type(state).__name__!r})")
        checks = {
            "replacement": (self.replacement, "sampler.replacement changed"),
            "seed": (self.seed, "sampler.seed changed"),
            "weights_fingerprint": (self.fingerprint(), "the weights changed (other shards, split or weighting scheme)"),
        }
        same_world = state.get("num_replicas") == self.num_replicas
        if same_world:
            checks["num_samples"] = (self.num_samples, "samples per rank changed (dataset size or num_samples)")
        for key, (mine, why) in checks.items():
            if state.get(key) != mine:
                raise ValueError(f"cannot resume sampler: saved {key}={state.get(key)!r} but this run has "
                                 f"{key}={mine!r}: {why}. Resume with the original configuration, "
                                 f"or start the epoch afresh without loading the sampler state.")
        epoch = int(state["epoch"])
        if epoch < 0:
            raise ValueError(f"saved epoch={epoch} must be >= 0")
        saved_r = int(state["num_replicas"])
        layout = tuple(state.get("layout") or (0, int(state["num_samples"]) * saved_r))   # format 1: a fresh layout
        position = int(state["position"])
        if not 0 <= position <= max(0, math.ceil((layout[1] - layout[0]) / saved_r)):
            raise ValueError(f"saved position={position} outside the saved layout {list(layout)} of {saved_r} ranks")
        self.epoch = epoch
        if same_world:
            self._layout, self._position = (int(layout[0]), int(layout[1])), position
        else:                        # elastic: the rest of the epoch over this run's ranks
            done = min(int(layout[1]), int(layout[0]) + position * saved_r)
            self._layout, self._position = (done, int(layout[1])), 0
        self._start = self._position


# --------------------------------------------------------------------------- evaluation split

def eval_indices(n: int, num_replicas: int | None = None,
                 rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of 0..n-1 for evaluation: (indices LongTensor, is_padding BoolTensor).

    Strided (rank r gets r, r+R, r+2R, ...), ceil(n/R) long on every rank; positions past n wrap
    to the start and are flagged is_padding so metrics drop them: over all ranks, the non-padding
    indices are 0..n-1, each exactly once, and there are R*ceil(n/R) - n padding rows in total.
    """
    num_replicas = dist.world_size() if num_replicas is None else int(num_replicas)
    rank = dist.rank() if rank is None else int(rank)
    _check_world(num_replicas, rank)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    idx, padding = eval_indices_at(np.arange(math.ceil(n / num_replicas), dtype=np.int64), n, rank, num_replicas)
    return torch.from_numpy(idx), torch.from_numpy(padding)


def eval_indices_at(t: np.ndarray, n: int, rank: int, num_replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries `t` of `eval_indices(n, num_replicas, rank)` as numpy (indices, is_padding), without the rest."""
    pos = rank + num_replicas * t
    padding = pos >= n
    return (pos % n if n else pos), padding
