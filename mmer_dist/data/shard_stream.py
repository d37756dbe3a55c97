"""Whole shards read front to back as a stream of samples: the stages both streaming loaders share.

    shards = SplitShards.of(location, index, "train")      # names, sample counts, first split position
    stage = wds.filters.pipelinefilter(read_shards)(shards)   # {"url": name} -> samples with "__index__"

* `read_shards` opens each shard through its `Location` (a folder, fsspec URL or `pipe:`; reads
  retry with backoff and resume at the byte reached, mmer_dist.shards.location), expands the tar
  with webdataset's own tar iterator and gives every sample its position in the split (the shard's
  first position from the index's `sizes`, plus its order in the tar): the epoch digests and the
  evaluation's coverage check count positions.
* A shard the index calls complete that cannot be read, is damaged or holds another number of
  samples than the index says is a `DataError` naming its URL at once, never a skip. An unreadable
  KEY.json is a counted skip (a bad input, like a decode failure).
* Node/worker split: `split_by_rank` (shard i -> rank i % R, rank passed explicitly), then webdataset's
  `split_by_worker`; `worker_shares` is that split's arithmetic, for the plans.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from mmer_dist.data.decode import Decoder, DecodeError, Skipped
from mmer_dist.data.loader import DataError
from mmer_dist.shards.location import Location, ShardMissing, ShardReadError
from mmer_dist.shards.schema import META_EXT, ShardIndex, split_index


def worker() -> tuple[int, int]:
    """(worker id, number of workers) of this DataLoader worker (WORKER/NUM_WORKERS env override it)."""
    import webdataset as wds

    _, _, wk, num_workers = wds.utils.pytorch_worker_info()
    return wk, num_workers


@dataclass
class SplitShards:
    """The shards of one split and where they live: names and sample counts in index order."""

    location: Location
    names: list[str]
    sizes: list[int]

    def __post_init__(self) -> None:
        starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self.starts = {n: int(s) for n, s in zip(self.names, starts)}
        self.count = dict(zip(self.names, map(int, self.sizes)))

    @classmethod
    def of(cls, location: Location, index: ShardIndex, split: str) -> "SplitShards":
        si = split_index(index, split, location)
        return cls(location, list(si.shards), list(si.sizes))

    def where(self) -> str:
        return f"{self.location} ({len(self.names)} shards)"


def worker_shares(sizes: list[int], world_size: int, workers: int) -> list[list[int]]:
    """Samples each (rank, worker) reads when shard i goes to rank i % R and the rank's k-th shard to worker k % W."""
    n = len(sizes)
    return [[sum(sizes[i] for i in list(range(r, n, world_size))[w::workers]) for w in range(workers)]
            for r in range(world_size)]


def split_by_rank(src: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Explicit node split: shard i goes to rank i % world_size (rank passed, not read from env)."""
    for i, shard in enumerate(src):
        if i % world_size == rank:
            yield shard


def read_shards(src: Iterator[dict], shards: SplitShards) -> Iterator[dict[str, Any]]:
    """{"url": shard name} -> that shard's samples in tar order, each with "__index__" (its split position)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for source in src:
        name = source["url"]
        stream = shards.location.open_stream(name)
        got = 0
        try:
            for got, sample in enumerate(group_by_keys(tar_file_expander([{"url": name, "stream": stream}])), 1):
                sample["__index__"] = shards.starts[name] + got - 1
                yield sample
        except (ShardMissing, ShardReadError) as e:
            raise DataError(f"{e}. The run cannot go on without it (a shard is never skipped)") from e
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"damaged shard {shards.location.shown(name)}: {type(e).__name__}: {e} (after {got} "
                            f"samples). The index says it is complete, so it changed after packing: re-pack or "
                            f"re-upload it") from e
        finally:
            stream.close()
        if got != shards.count[name]:
            raise DataError(f"{shards.location.shown(name)} holds {got} samples, the index says "
                            f"{shards.count[name]}: the shard changed after packing (truncated or replaced); "
                            f"re-pack or re-upload it")


class Pending:
    """Skips found before decoding (an unreadable KEY.json), re-emitted as `Skipped` markers by `emit_pending`
    so their counts reach the main process inside the batches."""

    def __init__(self) -> None:
        self.items: list[Skipped] = []


def label_or_park(src: Iterator[dict], pending: Pending) -> Iterator[dict]:
    """Attach `label_id` from KEY.json (for the class balancer); park unreadable samples as skips."""
    for sample in src:
        try:
            sample["label_id"] = int(json.loads(sample[META_EXT])["label_id"])
        except Exception as e:
            pending.items.append(Skipped(str(sample.get("__key__", "?")), "meta_corrupt", str(e),
                                         index=int(sample.get("__index__", -1))))
            continue
        yield sample


def emit_pending(src: Iterator[Any], pending: Pending) -> Iterator[Any]:
    for sample in src:
        while pending.items:
            yield pending.items.pop(0)
        yield sample


class StreamDecode:
    """Decode a wds sample (DecodeError -> Skipped marker); the crop is seeded by (seed, epoch, key)."""

    def __init__(self, decoder: Decoder, epoch: int) -> None:
        self.decoder, self.epoch = decoder, epoch

    def __call__(self, sample: Any) -> Any:
        if isinstance(sample, Skipped):
            return sample
        key, index = str(sample.get("__key__", "?")), int(sample.get("__index__", -1))
        try:
            out = self.decoder(sample, index=zlib.crc32(key.encode()), key=key, epoch=self.epoch)
        except DecodeError as e:
            return Skipped.from_error(e, index=index)
        out["pad"], out["index"] = False, index
        return out
