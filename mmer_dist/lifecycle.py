"""Process lifecycle: a process dies with the one that launched it; a run folder has one owner at a time.

    die_with_parent()                     # Linux: SIGKILL this process when its parent (the launcher) dies
    lock = RunLock(run_dir)               # an exclusive flock on RUN/.lock, or RunLockedError naming the holder
    lock.release()                        # also released by the kernel when the process dies, SIGKILL included

Why: torchrun and `accelerate launch` start the training ranks in sessions of their own, so a launcher
killed with SIGKILL (a node agent dying, the wrong pid killed) leaves its ranks running and writing
checkpoints; a `resume=latest` started then would race them on the same folder. A rank launched by such
a launcher therefore dies with it (at once, SIGKILL: a checkpoint half-written then has no
trainer_state.json and never counts as complete), and a run folder is locked by the process that trains
in it (the main rank), so a second `train` on it is refused while the first lives. Under `srun` without
torchrun the scheduler already kills the step with the job: the ranks are left to it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


def die_with_parent(parent: int | None = None) -> bool:
    """Linux: SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); True when armed. If the parent
    (`parent`, default the current one) is already gone, exit at once."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:      # the parent died before prctl took effect
        os._exit(1)
    return True


def launched_by_torchrun() -> bool:
    """True in a rank started by torchrun / `accelerate launch` (their elastic agent sets these variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


class RunLockedError(RuntimeError):
    """Another live process owns the run folder; the message names it and what to do."""


class RunLock:
    """An exclusive, non-blocking flock on `folder/.lock` holding {host, pid, started}; `release()` frees it.

    An OS lock, not a marker: the kernel drops it when the holder dies (SIGKILL included), so it never
    goes stale, and the file may stay behind harmlessly."""

    def __init__(self, folder: str | Path, what: str = "train") -> None:
        import fcntl

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.fd)
            os.close(self.fd)
            raise RunLockedError(
                f"{folder} is in use by another `mmer-dist {holder.get('what', what)}` (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}): one run folder has one owner. Wait "
                f"for it to finish, or stop it (kill {holder.get('pid', 'PID')} on {holder.get('host', 'its host')}) "
                f"and run again with resume=latest; or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"what": what, "host": socket.gethostname(), "pid": os.getpid(),
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)           # closing drops the flock; the file stays (unlinking it would race)
            self.fd = -1


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
