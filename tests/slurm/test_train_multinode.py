"""slurm/train.sbatch on the test cluster (CPU, gloo, one process per node):

* two nodes give the metrics and the exported weights of a local 2-process torchrun run of the same config;
* a job sent SIGTERM mid-run (what --signal=TERM@N, preemption and scontrol requeue send) checkpoints,
  requeues itself and resumes; then a rank killed mid-run (a crash) is requeued too; the final weights
  equal the uninterrupted run's bit for bit;
* a job whose ranks keep failing is requeued MMER_MAX_RESTARTS times, then fails with the reason in its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

# tiny and deterministic (dropout off): as tests/smoke/test_train.py
RUN = ["--config", "debug", "data.modalities=[text,audio]", "model.fusion.dropout=0.0", "model.text.dropout=0.0",
       "model.audio.dropout=0.0", "optim.warmup_steps=2", "data.batch_size=8", "train.log_every=1",
       "train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=2", "train.keep_checkpoints=10",
       "train.dist_timeout_s=120"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def _metrics(run: Path) -> dict[str, Any]:
    m = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k != "shards"}


def _submit(slurm: Any, shards: Path, out: Path, logs: Path, *sbatch: str) -> str:
    return slurm.sbatch("--nodes=2", *sbatch, f"--output={logs}/%x-%j.out", "slurm/train.sbatch",
                        "--shards", str(shards), "--out", str(out), *RUN)


@pytest.fixture(scope="module")
def local_run(slurm: Any, synth_meld_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: `torchrun --nproc_per_node 2 -m mmer_dist.train` of the same config, on this machine."""
    run = tmp_path_factory.mktemp("local") / "run"
    slurm.run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), "-m", "mmer_dist.train", "--shards", str(synth_meld_shards), "--out", str(run), *RUN,
              timeout=600)
    return run


def test_two_nodes_match_local_torchrun(slurm: Any, synth_meld_shards: Path, local_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = _submit(slurm, synth_meld_shards, run, tmp_path)
    (info,) = slurm.wait(job, timeout=400)
    log = (tmp_path / f"mmer-train-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2" and "2 node(s) x 1 process(es)" in log
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["slurm_job_id"] == job
    assert len(set(json.loads((run / "train_state.json").read_text())["param_checksums"])) == 1
    assert _metrics(run) == _metrics(local_run)
    a, b = _weights(local_run), _weights(run)
    assert a.keys() == b.keys()
    # Bit for bit here: the same CPU kernels on the same machine, the same data per rank (rank = node
    # index = local rank), the same 2-rank gloo all-reduce. Across real nodes (other CPUs, NCCL) expect
    # agreement to float rounding instead (rtol ~1e-5).
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    print(f"job {job} states seen:", *slurm.history[job], sep="\n  ")


def _train_records(run: Path) -> list[dict[str, Any]]:
    path = run / "log.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


def _wait_until(what: str, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout} s")


def _rank_pid(job: str, rank: int) -> int | None:
    """The pid of training rank `rank` of Slurm job `job` (a python started by slurmstepd)."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    for d in Path("/proc").iterdir():
        try:                                 # python -m mmer_dist.slurm train ... (not the srun that started it)
            if d.name.isdigit() and (d / "cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"mmer_dist.slurm",
                                                                                        b"train"]:
                env = set((d / "environ").read_bytes().split(b"\0"))
                if want <= env:
                    return int(d.name)
        except OSError:
            continue
    return None


def _requeued(slurm: Any, job: str, restarts: int) -> None:
    """Wait until the job was requeued `restarts` times, then start it without Slurm's 120 s delay."""
    _wait_until(f"restart {restarts}", lambda: slurm.jobs(job)[0]["Restarts"] == str(restarts))
    _wait_until(f"run {restarts} started", lambda: slurm.release(slurm.jobs(job)[0]) or slurm.state(job) == "RUNNING")


def test_stop_signal_and_crash_requeue_and_resume_bit_exact(slurm: Any, synth_meld_shards: Path, local_run: Path,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = _submit(slurm, synth_meld_shards, run, tmp_path, "--export=ALL,MMER_MAX_RESTARTS=2")
    # 1. a stop signal mid-run (what --signal=TERM@N sends before the time limit): checkpoint, requeue
    #    (one that comes while the processes start is held until the loop handles it: tests/unit/test_slurm_glue.py)
    _wait_until("two steps logged", lambda: len(_train_records(run)) >= 2)
    slurm.run("scancel", "--signal=TERM", job)
    _requeued(slurm, job, 1)
    stopped_at = max(r["step"] for r in _train_records(run))
    # 2. a crash after the resume (a rank killed, as the OOM killer would): requeued as a crash
    _wait_until("two steps after the resume", lambda: any(r["step"] >= stopped_at + 2 for r in _train_records(run)))
    pid = _rank_pid(job, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    _requeued(slurm, job, 2)
    (info,) = slurm.wait(job, timeout=400)
    log = (tmp_path / f"mmer-train-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", ("\n".join(slurm.history[job]) + "\n" + log[-1500:])
    assert f"SIGTERM received: checkpoint saved at step {stopped_at};" in log
    assert log.count("resumed from") == 2
    assert "requeueing (restart 2 of MMER_MAX_RESTARTS=2)" in log
    a, b = _weights(local_run), _weights(run)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    print(f"job {job} states seen:", *slurm.history[job], sep="\n  ")


def test_crash_is_requeued_up_to_the_limit_then_fails(slurm: Any, tmp_path: Path) -> None:
    empty = tmp_path / "no-shards"
    empty.mkdir()
    job = _submit(slurm, empty, tmp_path / "run", tmp_path, "--export=ALL,MMER_MAX_RESTARTS=1")
    (info,) = slurm.wait(job, timeout=300)
    log = (tmp_path / f"mmer-train-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1" and info["ExitCode"] != "0:0", log[-3000:]
    first, second = log.split(f"mmer-train: job {job}, restart 1:")           # two attempts, one log
    for attempt in (first, second):       # the rank that failed first says why (srun may stop the other)
        assert f"{empty / 'index.json'} not found" in attempt and "Exited with exit code 2" in attempt
    assert "requeueing (restart 1 of MMER_MAX_RESTARTS=1)" in first
    assert log.rstrip().endswith("MMER_MAX_RESTARTS=1 reached, not requeued: the job fails (the error is above)")
    print(f"job {job} states seen:", *slurm.history[job], sep="\n  ")
