"""Slurm glue for slurm/train.sbatch: run one training process per srun task, and decide what a failed step means.

    srun ... python -m mmer_dist.slurm train --config debug --shards S --out R resume=latest
    python -m mmer_dist.slurm after-step STATUS        # in the batch script, after srun

`train` is `python -m mmer_dist.train` with the two moments a stop signal (SIGTERM/SIGUSR1: Slurm's
--signal before a time limit, preemption, `scancel --signal`) could kill a process made safe:

* before the training loop installs its own handler (imports, process group, loaders: tens of
  seconds on a busy node), a stop signal is held and passed on to the loop's handler as soon as it
  is installed: the run stops at its first step like any stopped run. (Not requeued at once: srun
  sends the same SIGTERM to the other tasks when one crashes, and a crash must count as a crash.)
* after training returned, the signals are ignored: Python restores the default action of a handled
  signal while it shuts down, and a late signal would turn a finished run into a "crash".

In between, mmer_dist.train handles the signal: every rank checkpoints at the same step, exits 0, and
rank 0 requeues the job.

`after-step STATUS` runs in the batch script with srun's exit status: 0 is done (or stopped and already
requeued); non-zero while the job is still RUNNING is a crash, requeued while SLURM_RESTART_COUNT <
MMER_MAX_RESTARTS (default 3; every requeue counts, stops included), otherwise the job fails with
the reason as the last line of its log. Its exit status is srun's, so the job's state says what happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Mapping

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_MAX_RESTARTS = 3


def requeue(job: str) -> bool:
    """`scontrol requeue JOB`; False (with the reason on stderr) when Slurm refuses."""
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"mmer-train: could not requeue Slurm job {job}: {e}", file=sys.stderr)
        return False
    if res.returncode != 0:
        print(f"mmer-train: scontrol requeue {job}: {res.stderr.strip()}", file=sys.stderr)
    return res.returncode == 0


def job_state(job: str) -> str:
    """The job's JobState from `scontrol show job` ("" when it cannot be read)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""


def _stop_before_training(signum: int, frame: Any) -> None:
    """Hold a stop signal that came before the loop handles signals; a thread hands it on (see module doc)."""
    rank = os.environ.get("SLURM_PROCID", "0")
    print(f"mmer-train: rank {rank}: signal {signum} before the training loop started; passing it on to the "
          f"loop once it handles signals", file=sys.stderr, flush=True)
    threading.Thread(target=_pass_on, args=(signum,), daemon=True).start()


def _pass_on(signum: int, poll_s: float = 0.05) -> None:
    """Wait until the loop replaced our handler, then send `signum` again (to its handler this time)."""
    while signal.getsignal(signum) is _stop_before_training:
        time.sleep(poll_s)
    if callable(signal.getsignal(signum)):            # not SIG_IGN: training did not end before its loop began
        os.kill(os.getpid(), signum)


def run_training(argv: list[str]) -> int:
    """`python -m mmer_dist.train ARGV` in this process, safe against stop signals before and after it."""
    for s in STOP_SIGNALS:
        signal.signal(s, _stop_before_training)       # replaced by the loop's own handler once it starts
    from mmer_dist.train.__main__ import main

    try:
        return main(argv)
    finally:
        for s in STOP_SIGNALS:                         # SIG_IGN survives interpreter shutdown, a handler does not
            signal.signal(s, signal.SIG_IGN)


def after_step(status: int, env: Mapping[str, str] | None = None) -> int:
    """Requeue a crashed step while restarts remain, else say why the job fails; returns `status`."""
    env = os.environ if env is None else env
    if status == 0:
        return 0
    job = env.get("SLURM_JOB_ID", "")
    state = job_state(job) if job else ""
    if state != "RUNNING":      # requeued already (a stop signal), or cancelled: not a crash to count
        print(f"mmer-train: training exited with status {status} while the job is {state or 'gone'}; "
              f"not requeued again", file=sys.stderr)
        return status
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    limit = int(env.get("MMER_MAX_RESTARTS", str(DEFAULT_MAX_RESTARTS)) or 0)
    if restarts < limit:
        print(f"mmer-train: training exited with status {status}; requeueing (restart {restarts + 1} of "
              f"MMER_MAX_RESTARTS={limit})", file=sys.stderr, flush=True)
        requeue(job)
    else:
        print(f"mmer-train: training exited with status {status} after {restarts} restart(s); "
              f"MMER_MAX_RESTARTS={limit} reached, not requeued: the job fails (the error is above)",
              file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return run_training(argv[1:])
    if argv[:1] == ["after-step"] and len(argv) == 2 and argv[1].lstrip("-").isdigit():
        return after_step(int(argv[1]))
    print("usage: python -m mmer_dist.slurm train TRAIN_ARGS... | after-step STATUS (see slurm/train.sbatch)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
