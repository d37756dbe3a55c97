"""Process lifecycle with real processes: ranks die with their launcher, one owner per run folder, kills
during checkpoint writes never leave a checkpoint resume picks and cannot load, a failing or stalled
loader worker ends the run in bounded time with its error named."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_env, torchrun
from mmer_dist.train.checkpoint import complete_checkpoints, resolve_resume

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--config", "debug", "data.modalities=[text,audio]", "model.fusion.dropout=0.0", "model.text.dropout=0.0",
          "model.audio.dropout=0.0", "train.log_every=1", "optim.warmup_steps=2", "data.batch_size=4"]


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(cond, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


@pytest.mark.slow
def test_ranks_die_with_their_launcher_then_resume_equals_uninterrupted(synth_meld_shards, tmp_path):
    args = [*COMMON, "--shards", str(synth_meld_shards), "train.epochs=2", "train.checkpoint_every=2",
            "train.keep_checkpoints=10"]
    ref = tmp_path / "ref"
    subprocess.run(torchrun(2, [*args, "--out", str(ref)]), check=True, env=run_env(), cwd=REPO, timeout=600)
    run = tmp_path / "run"
    launcher = subprocess.Popen(torchrun(2, [*args, "--out", str(run)]), env=run_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: complete_checkpoints(run) or launcher.poll() is not None)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2 and launcher.poll() is None
    launcher.send_signal(signal.SIGKILL)          # only the launcher
    launcher.wait()
    _wait_for(lambda: not any(_alive(r) for r in ranks), timeout=10)      # the ranks went with it
    assert not (run / "metrics.json").exists()
    subprocess.run(torchrun(2, [*args, "--out", str(run), "resume=latest"]), check=True, env=run_env(), cwd=REPO,
                   timeout=600)
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_second_train_on_a_running_folder_is_refused_and_the_first_unharmed(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "mmer_dist.train", *COMMON, "--shards", str(synth_meld_shards), "--out", str(run),
            "train.epochs=3"]
    first = subprocess.Popen(args, env=run_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "log.jsonl").exists() or first.poll() is not None)
    second = subprocess.run([*args, "resume=latest"], env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "one run folder has one owner" in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] > 0
    # the lock went with its holder: the folder can be trained on again
    assert subprocess.run([*args, "train.epochs=4", "resume=latest"], env=run_env(), cwd=REPO, capture_output=True,
                          timeout=600).returncode == 0


@pytest.mark.slow
def test_kills_during_checkpoint_writes_never_leave_a_checkpoint_that_cannot_load(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "mmer_dist.train", *COMMON, "--shards", str(synth_meld_shards), "--out", str(run),
            "train.epochs=4", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    rng = random.Random(0)
    for trial in range(4):
        proc = subprocess.Popen([*args, *(["resume=latest"] if trial else [])], env=run_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: (run / "checkpoints").is_dir() or proc.poll() is not None)
        time.sleep(rng.uniform(0.0, 1.5))          # somewhere in the stream of checkpoint writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        chosen = resolve_resume(run, "latest")
        assert chosen is not None
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"} <= {
            p.name for p in chosen.iterdir()}, sorted(p.name for p in chosen.iterdir())
        json.loads((chosen / "trainer_state.json").read_text())
    assert subprocess.run([*args, "resume=latest"], env=run_env(), cwd=REPO, capture_output=True,
                          timeout=600).returncode == 0


FAULT = """
import os, signal, sys, time
from mmer_dist.data import shard_reader
real = shard_reader.ShardDataset.load
calls = [0]
def load(self, item):
    calls[0] += 1
    if os.environ.get("RANK", "0") == "0" and calls[0] == 30 and shard_reader.get_worker_info() is not None:
        if "{fault}" == "raise":
            raise RuntimeError("injected worker fault")
        if "{fault}" == "kill":
            os.kill(os.getpid(), signal.SIGKILL)         # as the OOM killer would
        if "{fault}" == "stall":
            time.sleep(3600)
    return real(self, item)
shard_reader.ShardDataset.load = load
from mmer_dist.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _faulty(tmp_path: Path, fault: str) -> Path:
    script = tmp_path / f"train_with_{fault}.py"
    script.write_text(FAULT.replace("{fault}", fault))
    return script


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "world", "says"), [
    ("raise", 1, "injected worker fault"), ("raise", 2, "injected worker fault"),
    ("kill", 2, "DataLoader worker (pid"), ("stall", 1, "DataLoader timed out after")])
def test_a_worker_that_fails_ends_the_run_with_its_error_on_every_rank(synth_meld_shards, tmp_path, fault, world, says):
    """A worker raises, is killed (SIGKILL) or delivers nothing for data.loader_timeout_s: the run ends
    well within the test's bound, every rank gone, the worker's error and its shards named."""
    script = _faulty(tmp_path, fault)
    args = [*COMMON, "--shards", str(synth_meld_shards), "--out", str(tmp_path / "run"), "train.epochs=5",
            "data.num_workers=1", "data.loader_timeout_s=5"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
            str(script), *args] if world > 1 else [sys.executable, str(script), *args])
    t0 = time.time()
    out = subprocess.run(cmd, env={**run_env(), "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and time.time() - t0 < 120
    assert "a data loader worker failed" in out.stderr and says in out.stderr, out.stderr[-3000:]
    assert "meld-train-" in out.stderr                      # what the worker was reading


@pytest.mark.slow
def test_sigterm_during_a_stall_stops_within_seconds(synth_meld_shards, tmp_path):
    script = _faulty(tmp_path, "stall")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), *COMMON, "--shards", str(synth_meld_shards), "--out", str(run),
                             "train.epochs=5", "data.num_workers=1", "train.checkpoint_every=2"],
                            env={**run_env(), "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: complete_checkpoints(run) or proc.poll() is not None)
    time.sleep(3)                                           # by now the worker sits in the injected stall
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30 and proc.returncode != 0
    assert "while waiting for data" in err and "resume=latest" in err
    state = json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state["step"] >= 2                               # the last completed step is checkpointed
