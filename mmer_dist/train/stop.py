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

While the loop waits for the next batch (`with stop.waiting(): ...`) a stop signal (or one noted just
before the wait) gives the fetch `grace` seconds (SIGALRM): a batch that comes in time finishes its step
and the run checkpoints as usual; otherwise `StoppedWaiting` is raised, so a run stalled on data (a
loader that cannot deliver) still stops within seconds.
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


class StoppedWaiting(BaseException):
    """Raised by a stop signal that arrives while the loop waits for data (the next step may never come).
    A BaseException, like KeyboardInterrupt: no `except Exception` on the way may swallow it."""


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT; the loop checks it once per optimizer step, agreed over ranks."""

    grace = 10.0

    def __init__(self) -> None:
        self.signum = 0
        self.interrupts = 0               # Ctrl-Cs so far: the second aborts
        self._pid = os.getpid()
        self._waiting = False

    def install(self) -> None:
        self._pid = os.getpid()
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        signal.signal(signal.SIGALRM, self._alarm)

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
        if self._waiting and signal.getitimer(signal.ITIMER_REAL)[0] == 0:
            signal.setitimer(signal.ITIMER_REAL, self.grace)    # the batch may still come: see _alarm

    def _alarm(self, signum: int, frame: Any) -> None:
        if self._waiting and self.signum and os.getpid() == self._pid:
            self._waiting = False
            raise StoppedWaiting(self.signum)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """The block waits for data: a stop signal interrupts it (StoppedWaiting) if it lasts `grace` more
        seconds."""
        self._waiting = True
        if self.signum:                      # already asked to stop: give the fetch `grace` seconds
            signal.setitimer(signal.ITIMER_REAL, self.grace)
        try:
            yield
        finally:
            self._waiting = False
            if self.signum:
                signal.setitimer(signal.ITIMER_REAL, 0)

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
    saved = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGALRM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
