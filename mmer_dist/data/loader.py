"""The rank-loader protocol: what every per-rank loader offers the training loop and the evaluator.

A rank loader yields collated batches (mmer_dist.data.collate) of this rank's share of one split.
Two implementations, neither importing the other, both built by mmer_dist.data.build:

* map-style (`data.loader=map`, mmer_dist.data.map_loader): random access into the tars at the
  byte offsets of the index, the exact distributed weighted sampler, mid-epoch resume by position;
* streaming (`data.loader=stream`, mmer_dist.data.stream_loader): whole tars read front to back
  through an explicit WebDataset pipeline, for corpora too large to index per sample.

    train = build_train_loader(cfg.data, cfg.sampler, tokenizer, rank=r, world_size=R, seed=s)
    train.label_names, train.class_counts          # from the index, read once: the loop never reads it
    for epoch in range(E):
        train.set_epoch(epoch)
        for batch in train.iter_from(batches_done):    # 0 unless resuming mid-epoch
            ...
            state = train.state_dict()               # after the step: resumable exactly there
    print(train.counts())          # {"skipped": {"audio_corrupt": 2}, "degraded": {"audio_empty": 1}}

NEVER pass a rank loader (or its DataLoader) through `accelerator.prepare`. It is already split by
rank: `prepare` would wrap it in a second, rank-sharding sampler (`BatchSamplerShard` /
`IterableDatasetShard`), so each rank would silently see only 1/world of its own share (and, for an
iterable, different batch counts per rank). Prepare only the model, the optimizer and the scheduler;
move batches to the device yourself (tests/smoke/test_loader_not_resharded.py shows both behaviours).

Every rank gets the same `len(loader)` batches per epoch, by construction. A sample that fails to
decode becomes a `Skipped` marker that the collate drops and counts by reason (the batch gets
smaller; the number of batches never changes); `counts()` is this rank's running total.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import threading
from collections import Counter
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from mmer_dist.data.seeds import add_digests, multiset_digest

LOADER_STATE_FORMAT = "mmer_dist.pipeline.TrainLoader/1"
"""Header of every train loader's `state_dict` (with `kind`: map | stream); the value is stored in
checkpoints, so it keeps the name it was first saved under."""


class RankLoader(Protocol):
    """The contract of a per-rank loader (train or eval)."""

    label_names: list[str]                 # the index's label set, in label-id order
    class_counts: list[int]                # samples per class of this loader's split, label-id order

    def __len__(self) -> int: ...          # batches per epoch, equal on every rank
    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def counts(self) -> dict[str, dict[str, int]]: ...


class DataError(RuntimeError):
    """Data a run cannot go on with (a damaged shard, too many undecodable samples): the message names the
    shard and the fix. The commands print it without a traceback."""


class SampleCounts:
    """Skip and degrade counters of one rank since this process started: what the collate reported.

    The shared base of the loaders. `counts()` is this rank's share; the loop sums it over ranks (and
    over the run's earlier processes, from the checkpoint) for log.jsonl, TensorBoard, metrics.json.
    A batch that carries damaged data (`batch["fatal"]`) raises `DataError` here, in the main process.
    """

    kind = ""

    def __init__(self) -> None:
        self.skipped: Counter = Counter()
        self.degraded: Counter = Counter()
        self.read = 0                 # samples drawn: delivered + skipped
        self.last_skip = ""           # where the last skipped sample was and why
        self._new_epoch()

    def _new_epoch(self) -> None:
        """Zero the current epoch's draw count and digest (mmer_dist.train.accounting logs them per epoch)."""
        self.epoch_drawn, self.epoch_digest = 0, 0

    def _count(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch.get("fatal"):
            raise DataError(f"damaged shard: {batch['fatal'][0]}. The index says this shard is complete, so it "
                            f"changed after packing. `mmer-dist verify SHARDS_DIR` lists every damaged shard "
                            f"and prints the command that re-packs them.")
        skipped = batch.get("skipped", {})
        self.skipped.update(skipped)
        self.degraded.update(batch.get("degraded", {}))
        self.read += len(batch["labels"]) + sum(skipped.values())
        self.last_skip = batch.get("last_skip") or self.last_skip
        drawn = [*(i for i in batch["index"].tolist() if i >= 0), *batch.get("skipped_index", [])]
        self.epoch_drawn += len(batch["labels"]) + sum(skipped.values())
        self.epoch_digest = add_digests(self.epoch_digest, multiset_digest(np.asarray(drawn, dtype=np.int64)))
        return batch

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples skipped (decode failures, by reason) and degraded (a modality absent) so far on this rank."""
        return {"skipped": dict(self.skipped), "degraded": dict(self.degraded)}

    def _state_header(self) -> dict[str, Any]:
        return {"format": LOADER_STATE_FORMAT, "kind": self.kind}

    def _load_header(self, state: dict[str, Any]) -> None:
        """Refuse a state saved by another kind of loader (or not a loader state)."""
        if state.get("format") != LOADER_STATE_FORMAT or state.get("kind") != self.kind:
            raise ValueError(f"not a {self.kind} train-loader state (format {state.get('format')!r}, "
                             f"kind {state.get('kind')!r}); the run was made with another data.loader")


_EXIT_HOOK: list[Any] = []


def _kill_leftover_workers() -> None:
    # Workers ignore SIGTERM (below), and multiprocessing's exit handler stops daemonic children with
    # SIGTERM, then joins them: a worker that its DataLoader did not shut down (an iterator still alive
    # in an exception's traceback or a reference cycle) would keep the process from ever exiting.
    # Registered after multiprocessing's own handler, so it runs first (atexit is last in, first out).
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def _worker_init(_: int) -> None:
    # one intra-op thread per worker: the workers are the parallelism (the codecs are set to one
    # thread in decode.py)
    torch.set_num_threads(1)
    # Stop signals are the main process's to handle: srun and Ctrl-C send them to every process of the
    # step or terminal group, and a worker killed by one would fail the run instead of letting the main
    # process checkpoint and stop (the DataLoader ends its workers itself, and they die with it).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def dataloader_settings(num_workers: int, timeout_s: float = 0.0) -> dict[str, Any]:
    """DataLoader keywords every loader uses (pinning, worker init, generator, the worker timeout)."""
    # A private generator: creating an iterator must not draw from the global torch RNG, or a resumed
    # run (whose iterator starts mid-epoch) would see different dropout masks than an uninterrupted one.
    # The timeout turns a worker that cannot deliver a batch (e.g. "unable to open shared memory object")
    # into an error instead of a hang; torch itself notices a worker that died.
    if num_workers > 0 and not _EXIT_HOOK:
        _EXIT_HOOK.append(atexit.register(_kill_leftover_workers))
    return {"pin_memory": torch.cuda.is_available(), "worker_init_fn": _worker_init if num_workers > 0 else None,
            "generator": torch.Generator().manual_seed(0), "timeout": timeout_s if num_workers > 0 else 0.0}


def _worker_failed(e: BaseException, reading: Callable[[], str]) -> DataError:
    first = next((line for line in reversed(str(e).strip().splitlines()) if line.strip()), str(e))
    return DataError(f"a data loader worker failed: {first.strip()[:500]}. The workers were reading: {reading()}. "
                     f"A worker that times out raises after data.loader_timeout_s; check the shards with "
                     f"`mmer-dist verify SHARDS_DIR`")


_READING: list[Callable[[], str]] = []      # what the running loaders read, the innermost last (eval inside train)


def _name_worker_deaths() -> None:
    """torch notices a worker killed by a signal from a SIGCHLD handler that raises its RuntimeError in the
    main process wherever it happens to be (in a backward pass, an all-reduce): wrap that handler so the
    error is the same named DataError as a failure seen while fetching a batch."""
    if threading.current_thread() is not threading.main_thread():      # signals belong to the main thread
        return
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler) or getattr(torch_handler, "names_worker_deaths", False):
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            torch_handler(signum, frame)
        except RuntimeError as e:
            raise _worker_failed(e, _READING[-1] if _READING else lambda: "(no loader running)") from e

    handler.names_worker_deaths = True      # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, handler)


def batches_of(loader: Any, reading: Callable[[], str]) -> Iterator[dict[str, Any]]:
    """The batches of a DataLoader; a worker that died, raised or timed out becomes a `DataError` naming
    its error and what the workers were reading (`reading()`), in the main process. Batches that fail or
    are abandoned shut their workers down at once (persistent ones too, then dropped so that the next
    epoch starts new ones), not whenever the iterator happens to be garbage-collected."""
    batches = iter(loader)
    _READING.append(reading)
    _name_worker_deaths()
    ended = False
    try:
        yield from batches
        ended = True
    except DataError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        # raised in a worker: torch re-raises it with the worker's traceback as the message; keep ours
        raise DataError(text.rsplit("DataError: ", 1)[-1].strip()) from e
    except Exception as e:         # a worker's exception, re-raised here by torch with its traceback as text
        raise _worker_failed(e, reading) from e
    finally:
        _READING.remove(reading)
        shutdown = getattr(batches, "_shutdown_workers", None)       # torch's multi-worker iterator
        if not ended and shutdown is not None:
            shutdown()
            if getattr(loader, "_iterator", None) is batches:      # a persistent-workers DataLoader's
                loader._iterator = None
