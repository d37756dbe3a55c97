"""Stopping a run cleanly: stop signals agreed over ranks, and the Slurm requeue after a stop.

    stop = StopRequest(); stop.install()       # SIGTERM / SIGUSR1 (Slurm's warning before a time limit), SIGINT
    if stop.agreed(device): checkpoint(); requeue_if_slurm(is_main, stop.signum)

Every rank checks the flag once per optimizer step through an all-reduce, so all ranks stop at the
same step, save one checkpoint and exit (code 0); `resume=latest` continues exactly there.

Ctrl-C (SIGINT) does what SIGTERM does, with a line saying so at once; a second Ctrl-C aborts at once
with exit code 130, without a checkpoint (the run resumes from its last one). Only the process that
installed the handler acts on SIGINT: a DataLoader worker forked from it inherits the handler and
ignores the signal, so a terminal's Ctrl-C (sent to every process of the foreground group) does not
kill the workers the next step needs. A stop asked by SIGINT never requeues a Slurm job: the user
meant it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from mmer_dist import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ABORT_EXIT_CODE = 130          # 128 + SIGINT, what a shell reports for a Ctrl-C


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT; the loop checks it once per optimizer step, agreed over ranks."""

    def __init__(self) -> None:
        self.signum = 0
        self.interrupts = 0               # Ctrl-Cs so far: the second aborts
        self._pid = os.getpid()

    def install(self) -> None:
        self._pid = os.getpid()
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:      # a forked DataLoader worker: the main process handles it
            return
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self._say("second interrupt: aborting now without a checkpoint; resume=latest continues from "
                          "the last saved one")
                os._exit(ABORT_EXIT_CODE)     # at once: no waiting for the step, the loaders or other ranks
            self._say("interrupt: saving a checkpoint after this step, then exiting (Ctrl-C again to abort at once)")
        self.signum = self.signum or signum

    @staticmethod
    def _say(text: str) -> None:
        if dist.world_info().rank == 0:
            os.write(2, f"\n{text}\n".encode())   # os.write: safe inside a signal handler, unlike print

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank received a stop signal; `signum` becomes the agreed one."""
        flag = torch.tensor([float(self.signum)], device=device)
        agreed = int(dist.all_reduce_max(flag).item())
        if agreed and not self.signum:
            self.signum = agreed
        return agreed > 0

    @property
    def name(self) -> str:
        """"SIGTERM", "SIGINT", ... of the stop signal ("" before one arrived)."""
        return signal.Signals(self.signum).name if self.signum else ""


def requeue_if_slurm(main: bool, signum: int = signal.SIGTERM) -> None:
    """Under Slurm with --requeue, put the job back in the queue after a SIGTERM/SIGUSR1 stop; it resumes
    with resume=latest. A Ctrl-C (SIGINT) stop is the user's: no requeue."""
    job = os.environ.get("SLURM_JOB_ID")
    if main and job and signum in REQUEUE_SIGNALS and os.environ.get("MMER_REQUEUE", "1") == "1":
        try:
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"could not requeue Slurm job {job}: {e}", file=sys.stderr)


@contextmanager
def handlers_restored() -> Iterator[None]:
    """Put back the handlers of the stop signals afterwards: an in-process caller of train() (a test, a
    notebook) gets its own Ctrl-C back."""
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
