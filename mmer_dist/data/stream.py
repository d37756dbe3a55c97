"""Streaming train loader (`data.loader=stream`): an explicit WebDataset pipeline per rank and worker.

    # through the usual factory: mmer_dist.data.pipeline.build_train_loader dispatches on data.loader
    train = build_train_loader(cfg.data.shards, cfg.data, cfg.sampler, tokenizer, rank=r, world_size=R)
    for epoch in range(E):
        train.set_epoch(epoch)
        for batch in train.iter_from(batches_done_in_this_epoch):     # 0 unless resuming
            ...
    StreamPlan(sizes, batch_size, world_size, num_workers, resample)  # the epoch arithmetic, or a refusal
    stage = ClassBalancedStream(target, seed=s)   # the class balancer alone: any iterator / wds stage

Why it exists: for corpora too large to index per sample. The map-style loader
(mmer_dist.data.pipeline) keeps every sample's member offsets and an epoch plan over all samples
in every process; the stream needs only the index's shard list, shard sizes and class counts, and
reads each tar front to back (sequential reads, which suit network and object storage).

* `stream_pipeline` is the pipeline, one commented stage per line: shard source (resampled, the
  default, or each shard once with an explicit rank split then worker split), tar -> samples,
  shuffle buffer, label from KEY.json, optional class balance, decode, collate.
* `StreamPlan` gives every rank and every worker exactly the same number of batches per epoch,
  computed from the index; configurations that cannot hold that are refused with the numbers and
  the fix (e.g. fewer shards than ranks x workers without resampling).
* `ClassBalancedStream` makes the labels follow p_c proportional to n_c * w_c (the class mix the
  map-style weighted sampler draws) when sampler.weighting is not `none`.
* Damaged tars and unreadable KEY.json are counted as `Skipped` markers inside the batches, like
  decode failures; a missing shard is fatal.
* Resume inside an epoch replays the (deterministic) stream and discards the consumed batches.

Like the map-style loader, a `StreamLoader` is already split by rank: NEVER pass it through
`accelerator.prepare` (see mmer_dist.data.pipeline).
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmer_dist import dist
from mmer_dist.config import DataConfig, SamplerConfig
from mmer_dist.data.collate import Collator
from mmer_dist.data.decode import Decoder, DecodeError, Skipped
from mmer_dist.data.pipeline import LOADER_STATE_FORMAT, LoaderBase, loader_settings, train_class_weights
from mmer_dist.data.sampler import _mix, class_target_distribution   # _mix: the sampler's 63-bit seed mix
from mmer_dist.shards.schema import META_EXT, load_index, split_index

# --------------------------------------------------------------------------- seeds and worker identity


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of this DataLoader worker (WORKER/NUM_WORKERS env override it)."""
    import webdataset as wds

    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    return worker, num_workers


def _crc_seed(*parts: int) -> int:
    """The stream's seeds: CRC32 of the joined integers (the values are part of the stream's definition)."""
    return zlib.crc32(":".join(str(int(p)) for p in parts).encode())


class _WorkerSeed:
    """worker_seed for wds.ResampledShards: distinct per (rank, worker); picklable."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 100_003 + _worker()[0]


# --------------------------------------------------------------------------- pipeline stages


def _split_by_rank(src: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Explicit node split: shard i goes to rank i % world_size (rank passed, not read from env)."""
    for i, shard in enumerate(src):
        if i % world_size == rank:
            yield shard


class TarErrors:
    """wds handler for tar-level failures (a damaged shard): count and continue; a missing shard is fatal.

    Failures are parked in `pending` and re-emitted as `Skipped` markers further down the stream
    (`_emit_pending`), so the counts reach the main process inside the batches.
    """

    def __init__(self) -> None:
        self.pending: list[Skipped] = []

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, FileNotFoundError):
            raise FileNotFoundError(f"shard missing: {exn}; the index lists it: re-run `mmer-dist pack`") from exn
        self.pending.append(Skipped("?", "tar_error", f"{type(exn).__name__}: {exn}"))
        return True


def _label_or_park(src: Iterator[dict], errors: TarErrors) -> Iterator[dict]:
    """Attach `label_id` from KEY.json (for the class balancer); park unreadable samples as skips."""
    for sample in src:
        try:
            sample["label_id"] = int(json.loads(sample[META_EXT])["label_id"])
        except Exception as e:
            errors.pending.append(Skipped(str(sample.get("__key__", "?")), "meta_corrupt", str(e)))
            continue
        yield sample


def _emit_pending(src: Iterator[dict], errors: TarErrors) -> Iterator[Any]:
    for sample in src:
        while errors.pending:
            yield errors.pending.pop(0)
        yield sample


class _WorkerShuffle:
    """wds shuffle with an rng seeded by (seed, epoch, rank, worker): reproducible and distinct per worker."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        from webdataset.filters import _shuffle

        rng = random.Random(_crc_seed(self.seed, self.epoch, self.rank, _worker()[0]))
        return _shuffle(src, self.bufsize, min(self.bufsize, 100), rng=rng)


class _StreamDecode:
    """Decode a wds sample (DecodeError -> Skipped marker); the crop is seeded by (seed, epoch, key)."""

    def __init__(self, decoder: Decoder, epoch: int) -> None:
        self.decoder, self.epoch = decoder, epoch

    def __call__(self, sample: Any) -> Any:
        if isinstance(sample, Skipped):
            return sample
        key = str(sample.get("__key__", "?"))
        try:
            out = self.decoder(sample, index=zlib.crc32(key.encode()), key=key, epoch=self.epoch)
        except DecodeError as e:
            return Skipped.from_error(e)
        out["pad"] = False
        return out


# --------------------------------------------------------------------------- class balance (a stage)


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
    (seed, rank, DataLoader worker id, epoch), so workers and ranks draw differently; call
    set_epoch() for a new stream each epoch. Tolerance: the output class frequencies of N items
    are multinomial(N, target): |freq_c - target_c| <= 5 * sqrt(target_c (1 - target_c) / N).

    `stats` (per worker process) counts pulled, emitted and dropped items per class.
    """

    def __init__(self, target: Sequence[float] | np.ndarray, *, label_of: Callable[[Any], int] | None = None,
                 buffer_size: int = 64, seed: int = 0, patience: int = 100_000) -> None:
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
        return np.random.default_rng(_mix(self.seed, dist.rank(), worker, self.epoch))

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


# --------------------------------------------------------------------------- plan, pipeline, loader


class StreamPlan:
    """The streaming epoch, computed from the index: batches per worker and per rank, or a refusal."""

    def __init__(self, sizes: list[int], batch_size: int, world_size: int, num_workers: int, resample: bool,
                 steps_per_epoch: int = 0, where: str = "") -> None:
        self.workers = max(1, num_workers)
        shards, n = len(sizes), int(sum(sizes))
        b, r, w = batch_size, world_size, self.workers
        if n == 0:
            raise ValueError(f"{where}: the split has no samples")
        steps = steps_per_epoch or n // (b * r)
        if steps == 0:
            raise ValueError(f"{where}: {n} samples < one global batch (data.batch_size={b} x {r} ranks = {b * r}); "
                             f"lower data.batch_size, use fewer processes or set data.steps_per_epoch")
        if resample:
            self.per_worker = math.ceil(steps / w)
        else:
            if shards < r * w:
                raise ValueError(
                    f"{where}: streaming without resampling needs at least world size x workers shards so every "
                    f"worker gets one, but there are {shards} shards for {r} ranks x {w} workers = {r * w}. "
                    f"Fix: set data.stream_resample=true (equal epochs by resampling), or data.num_workers <= "
                    f"{max(1, shards // r) if shards >= r else 0}{' and fewer ranks' if shards < r else ''}, "
                    f"or repack with smaller shards (at least {r * w}), or use data.loader=map")
            # worker w of rank r reads shards (r + R*k) for k = w, w + W, ...: its share of the samples
            shares = [sum(sizes[i] for i in list(range(rk, shards, r))[wk::w]) for rk in range(r) for wk in range(w)]
            limit = min(shares) // b
            if limit == 0:
                raise ValueError(f"{where}: without resampling the smallest worker share holds {min(shares)} samples, "
                                 f"less than data.batch_size={b}; set data.stream_resample=true or use fewer workers")
            wanted = math.ceil(steps_per_epoch / w) if steps_per_epoch else limit
            if wanted > limit:
                raise ValueError(f"{where}: data.steps_per_epoch={steps_per_epoch} needs {wanted} batches per worker but "
                                 f"the smallest worker share holds {limit} without repeating; set data.stream_resample=true "
                                 f"or data.steps_per_epoch <= {limit * w}")
            self.per_worker = wanted
        self.per_rank = self.per_worker * w


def stream_pipeline(urls: list[str], cfg_data: DataConfig, decoder: Decoder, collate: Collator, rank: int,
                    world_size: int, epoch: int, seed: int, per_worker: int,
                    balance: ClassBalancedStream | None = None) -> Any:
    """The explicit WebDataset pipeline of one rank; each worker yields exactly `per_worker` batches."""
    import webdataset as wds

    errors = TarErrors()
    if cfg_data.stream_resample:
        # an endless shard stream per (rank, worker), seeded by (seed, epoch) and (rank, worker):
        # the seed is the node/worker split, no shard list to divide
        source = [wds.ResampledShards(urls, seed=_crc_seed(seed, epoch), worker_seed=_WorkerSeed(rank),
                                      deterministic=True)]
    else:
        source = [
            wds.SimpleShardList(urls),                                           # every shard, index order
            wds.filters.pipelinefilter(_split_by_rank)(rank, world_size),        # node split: shard i -> rank i % R
            wds.split_by_worker,                                                 # worker split within the rank
        ]
    if balance is not None:
        balance.set_epoch(epoch)
    pipeline = wds.DataPipeline(
        *source,
        wds.tarfile_to_samples(handler=errors),                  # tar -> {__key__, json, txt, flac, mp4}; count damage
        _WorkerShuffle(cfg_data.shuffle_buffer, seed, epoch, rank),  # sample shuffle buffer, per-worker seed
        wds.filters.pipelinefilter(_label_or_park)(errors),      # label from KEY.json (unreadable -> skip)
        balance,                                                 # optional class-balanced resampling (None = off)
        wds.filters.pipelinefilter(_emit_pending)(errors),       # damaged members/shards -> Skipped markers
        wds.map(_StreamDecode(decoder, epoch)),                  # decode after the shuffle, in the worker
        wds.batched(cfg_data.batch_size, collation_fn=collate, partial=False),  # pad + masks; full batches only
    )
    # exactly per_worker batches from every worker (repeating the pass if the source ends early)
    return pipeline.with_epoch(nbatches=per_worker)


class StreamLoader(LoaderBase):
    """The streaming per-rank train loader: `len` batches per epoch on every rank. Not for `prepare`."""

    kind = "stream"

    def __init__(self, shards_dir: str | Path, split: str, cfg_data: DataConfig, cfg_sampler: SamplerConfig,
                 decoder: Decoder, collate: Collator, rank: int, world_size: int, seed: int) -> None:
        super().__init__()
        root = Path(shards_dir)
        index = load_index(root)
        sidx = split_index(index, split, root)
        self.urls = [str(root / s) for s in sidx.shards]
        self.cfg, self.decoder, self.collate = cfg_data, decoder, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.plan = StreamPlan(sidx.sizes, cfg_data.batch_size, world_size, cfg_data.num_workers,
                               cfg_data.stream_resample, cfg_data.steps_per_epoch,
                               where=f"{root} split {split} (data.loader=stream)")
        self.balance_target: np.ndarray | None = None
        if cfg_sampler.weighting != "none":
            counts = [sidx.class_counts.get(n, 0) for n in index.labels]
            cw = train_class_weights(counts, list(index.labels), cfg_sampler)
            self.balance_target = class_target_distribution(counts, cw)
        self.epoch, self._start = 0, 0

    def __len__(self) -> int:
        return self.plan.per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def pipeline(self) -> Any:
        balance = None
        if self.balance_target is not None:
            balance = ClassBalancedStream(self.balance_target, seed=_crc_seed(self.seed, self.rank))
        return stream_pipeline(self.urls, self.cfg, self.decoder, self.collate, self.rank, self.world_size,
                               self.epoch, self.seed, self.plan.per_worker, balance)

    def iter_from(self, batches_done: int | None = None) -> Iterator[dict[str, Any]]:
        """The rest of the epoch; resuming at batch n replays the deterministic stream and drops n batches."""
        start = self._start if batches_done is None else int(batches_done)
        loader = DataLoader(self.pipeline(), batch_size=None, num_workers=self.cfg.num_workers,
                            **loader_settings(self.cfg.num_workers))
        for k, batch in enumerate(loader):
            if k < start:
                continue
            self._start = k + 1
            yield self._count(batch)
        self._start = 0 if self._start >= len(self) else self._start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(None)

    def state_dict(self) -> dict[str, Any]:
        return {"format": LOADER_STATE_FORMAT, "kind": self.kind, "epoch": self.epoch, "batches_done": self._start,
                "world_size": self.world_size, "seed": self.seed, **self.counts()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(f"cannot resume the stream: saved world_size={state['world_size']} seed={state['seed']}, "
                             f"this run {self.world_size}/{self.seed}; resume with the original launch")
        self.epoch, self._start = int(state["epoch"]), int(state["batches_done"])
        self._load_counts(state)
