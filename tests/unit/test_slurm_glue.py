"""mmer_dist.slurm without a cluster: a stop signal before the training loop handles signals is held and
passed on (the run stops at its first step), the stop signals are ignored once training returned, a
finished step is not a crash.
(tests/slurm runs the same code under a real scheduler.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mmer_dist import slurm

REPO = Path(__file__).resolve().parents[2]


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the kernel's SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_stop_signal_while_starting_stops_the_run_at_its_first_step(synth_meld_shards: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SLURM_PROCID="0")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mmer_dist.slurm", "train", "--config", "debug", "--shards",
                             str(synth_meld_shards), "--out", str(run), "data.modalities=[text]",
                             "train.max_steps=50"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 30
    while not catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)                    # the first handler is mmer_dist.slurm's: the loop's comes seconds later
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "rank 0: signal 15 before the training loop started; passing it on" in err
    assert "SIGTERM received: checkpoint saved at step 1;" in out + err
    assert (run / "checkpoints" / "step-000001" / "trainer_state.json").exists() and not (run / "metrics.json").exists()


def test_stop_signals_are_ignored_after_training_returned() -> None:
    before = {s: signal.getsignal(s) for s in slurm.STOP_SIGNALS}
    try:
        assert slurm.run_training(["--config", "debug", "--dump-config"]) == 0
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in slurm.STOP_SIGNALS)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_after_step_passes_success_and_refuses_bad_usage(capsys) -> None:
    assert slurm.after_step(0, {"SLURM_JOB_ID": "1", "SLURM_RESTART_COUNT": "9", "MMER_MAX_RESTARTS": "0"}) == 0
    assert capsys.readouterr().err == ""
    assert slurm.after_step(3, {}) == 3                # no job: nothing to requeue, the status is kept
    assert "not requeued again" in capsys.readouterr().err
    assert slurm.main(["after-step", "x"]) == 2 and slurm.main([]) == 2
