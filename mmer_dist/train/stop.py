"""Stopping a run cleanly: stop signals agreed over ranks, and the Slurm requeue after a stop.

    stop = StopRequest(); stop.install()       # SIGTERM / SIGUSR1 (Slurm's warning before a time limit)
    if stop.agreed(device): checkpoint(); requeue_if_slurm(is_main)

Every rank checks the flag once per optimizer step through an all-reduce, so all ranks stop at the
same step, save one checkpoint and exit; `resume=latest` continues exactly there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Any, Iterator

import torch

from mmer_dist import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedWaiting(BaseException):
    """Raised by a stop signal that arrives while the loop waits for data (the next step may never come).
    A BaseException, like KeyboardInterrupt: no `except Exception` on the way may swallow it."""


class StopRequest:
    """Set by SIGTERM/SIGUSR1; the loop checks it once per optimizer step, agreed over ranks.

    While the loop waits for the next batch (`with stop.waiting(): ...`) a signal raises `StoppedWaiting`
    instead, so a run stalled on data (a loader that cannot deliver) still stops within seconds; a signal
    noted just before such a wait raises after `grace` seconds of waiting (a SIGALRM timer)."""

    grace = 10.0

    def __init__(self) -> None:
        self.signum = 0
        self._waiting = False

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        signal.signal(signal.SIGALRM, self._alarm)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self._waiting:
            self._waiting = False
            raise StoppedWaiting(signum)

    def _alarm(self, signum: int, frame: Any) -> None:
        if self._waiting and self.signum:
            self._waiting = False
            raise StoppedWaiting(self.signum)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The block waits for data: a stop signal interrupts it (StoppedWaiting) rather than being noted."""
        self._waiting = True
        if self.signum:                      # already asked to stop: give the fetch `grace` seconds
            signal.setitimer(signal.ITIMER_REAL, self.grace)
        try:
            yield
        finally:
            self._waiting = False
            if self.signum:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank received a stop signal."""
        flag = torch.tensor([1.0 if self.signum else 0.0], device=device)
        return bool(dist.all_reduce_max(flag).item() > 0)


def requeue_if_slurm(main: bool) -> None:
    """Under Slurm with --requeue, put the job back in the queue; it resumes with resume=latest."""
    job = os.environ.get("SLURM_JOB_ID")
    if main and job and os.environ.get("MMER_REQUEUE", "1") == "1":
        try:
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"could not requeue Slurm job {job}: {e}", file=sys.stderr)
