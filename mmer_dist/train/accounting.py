"""Every training sample accounted for: counts summed over ranks and over the processes of a run.

    acct = DataAccounting(loader, state, cfg.data.max_skip_fraction)
    read, skipped, degraded = acct.running()     # a collective, cheap: three numbers (log lines)
    acct.check(read, skipped)                    # DataError past data.max_skip_fraction, naming the last skip
    acct.store(state)                            # a collective: per-reason totals into the checkpoint state
    record = acct.end_epoch(epoch)               # a collective: {"epoch_end", "samples", "digest"} (split "epoch")

The rank loaders count what this process drew since it started (mmer_dist.data.loader.SampleCounts);
the checkpoint keeps the run's totals, so a resumed run continues them, on any number of ranks. The
epoch digest is the order-free digest of the dataset indices an epoch drew (mmer_dist.data.seeds):
equal digests mean the same multiset of samples, e.g. an epoch resumed on 3 ranks after 2.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from mmer_dist import dist
from mmer_dist.data.loader import DataError
from mmer_dist.data.seeds import add_digests
from mmer_dist.train.checkpoint import TrainerState


class DataAccounting:
    """The run's data counts: the checkpoint's totals plus what every rank's loader counted since."""

    def __init__(self, loader: Any, state: TrainerState, max_skip_fraction: float) -> None:
        self.loader, self.max_skip_fraction = loader, max_skip_fraction
        self.base_read = state.samples_read
        self.base_skipped, self.base_degraded = Counter(state.skipped), Counter(state.degraded)
        self.base_epoch = (state.epoch, state.epoch_drawn, state.epoch_digest)

    def running(self) -> tuple[int, int, int]:
        """(read, skipped, degraded) of the whole run so far (a collective)."""
        t = torch.tensor([self.loader.read, sum(self.loader.skipped.values()), sum(self.loader.degraded.values())],
                         dtype=torch.int64)
        read, skipped, degraded = dist.all_reduce_sum(t).tolist()
        return (self.base_read + read, sum(self.base_skipped.values()) + skipped,
                sum(self.base_degraded.values()) + degraded)

    def check(self, read: int, skipped: int) -> None:
        """Fail the run when more than data.max_skip_fraction of the samples read failed to decode."""
        if skipped > self.max_skip_fraction * max(read, 1):
            raise DataError(f"{skipped} of {read} training samples failed to decode, more than "
                            f"data.max_skip_fraction={self.max_skip_fraction:g}; the last on this rank: "
                            f"{self.loader.last_skip or '(on another rank)'}. Check the shards with `mmer-dist verify "
                            f"SHARDS_DIR`, or raise data.max_skip_fraction to train on without them.")

    def totals(self) -> dict[str, Any]:
        """{"read", "skipped": {reason: n}, "degraded": {reason: n}} of the whole run (a collective)."""
        counts = dist.all_gather_object((self.loader.read, dict(self.loader.skipped), dict(self.loader.degraded)))
        skipped, degraded = Counter(self.base_skipped), Counter(self.base_degraded)
        for _, s, d in counts:
            skipped.update(s)
            degraded.update(d)
        return {"read": self.base_read + sum(c[0] for c in counts),
                "skipped": dict(sorted(skipped.items())), "degraded": dict(sorted(degraded.items()))}

    def _epoch(self, epoch: int) -> tuple[int, int]:
        """(drawn, digest) of `epoch` so far over all ranks and processes (a collective)."""
        t = dist.all_reduce_sum(torch.tensor([self.loader.epoch_drawn, self.loader.epoch_digest], dtype=torch.int64))
        base_epoch, drawn, digest = self.base_epoch
        if base_epoch == epoch:
            return drawn + int(t[0]), add_digests(digest, int(t[1]))
        return int(t[0]), int(t[1])

    def store(self, state: TrainerState) -> None:
        """Write the run's totals into the state a checkpoint saves (a collective)."""
        totals = self.totals()
        state.samples_read, state.skipped, state.degraded = totals["read"], totals["skipped"], totals["degraded"]
        state.epoch_drawn, state.epoch_digest = self._epoch(state.epoch)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """The record of a finished epoch: the samples it drew and their digest (a collective)."""
        drawn, digest = self._epoch(epoch)
        return {"epoch_end": epoch, "samples": drawn, "digest": f"{digest & ((1 << 64) - 1):016x}"}
