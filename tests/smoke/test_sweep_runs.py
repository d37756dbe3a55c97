"""A real sweep end to end on a synthetic RAVDESS corpus: 2 seeds of the debug preset on 2 processes
(torchrun), killed mid-way (SIGKILL to the sweep's whole process group: no rank survives), re-run: the
finished run is not redone, the interrupted one resumes from its checkpoint; then `summarize`
(intervals, plot) and `compare` of the two seeds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_env

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 40
TRAIN = ["data.modalities=[text,audio]", "model.fusion.dropout=0.0", f"train.max_steps={MAX_STEPS}",
         "train.checkpoint_every=5", "train.eval_every=20", "train.log_every=5", "optim.warmup_steps=2",
         "data.batch_size=8"]


def _mmer(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmer_dist.cli", *args]


@pytest.fixture(scope="module")
def ravdess_shards(tmp_path_factory) -> Path:
    """12 synthetic actors x 8 clips, audio only; packed with the default actor split (test: the last 4)."""
    root = tmp_path_factory.mktemp("ravdess")
    for cmd in (_mmer("synth", "ravdess", "--out", str(root / "raw"), "--n", "96", "--no-video"),
                _mmer("pack", "ravdess", "--root", str(root / "raw"), "--out", str(root / "shards"))):
        subprocess.run(cmd, check=True, env=run_env(), cwd=REPO, capture_output=True, timeout=300)
    return root / "shards"


def _interrupted(run: Path) -> bool:
    """The run has a complete checkpoint and has not finished."""
    ckpts = run / "checkpoints"
    return (not (run / "metrics.json").exists() and ckpts.is_dir()
            and any((c / "trainer_state.json").exists() for c in ckpts.iterdir()))


def _tree(root: int) -> list[int]:
    """`root` and its descendants (torchrun's ranks run in sessions of their own: killpg alone misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (the sweep's unique folder): the sweep, torchrun, its ranks."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:      # exited while we looked
            continue
    return pids


@pytest.mark.slow
def test_sweep_killed_and_rerun_finishes_the_rest(ravdess_shards, tmp_path):
    out = tmp_path / "sweep"
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    cmd = _mmer("sweep", "--config", "debug", "--shards", str(ravdess_shards), "--out", str(out), "--seeds", "0,1",
                "--launcher", launcher, *TRAIN)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=run_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        while not _interrupted(out / "seed1"):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "seed1 never wrote a checkpoint"
            time.sleep(0.1)
        tree = _tree(proc.pid)
        assert len(tree) >= 4, tree                               # sweep, torchrun, 2 ranks
        os.killpg(proc.pid, signal.SIGKILL)                       # the sweep and torchrun
        for pid in tree[1:]:                                      # the ranks, in their own sessions
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for _ in range(100):
        if not _processes_mentioning(str(out)):
            break
        time.sleep(0.1)
    assert _processes_mentioning(str(out)) == []
    finished = {p: p.stat().st_mtime_ns for p in (out / "seed0" / "metrics.json", out / "seed0" / "eval-test" / "metrics.json")}

    again = subprocess.run(cmd, env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 runs, 1 finished, 1 to run" in again.stdout
    assert "seed1: resuming from its checkpoints" in again.stdout and "resumed from" in again.stdout + again.stderr
    assert json.loads((out / "seed1" / "train_state.json").read_text())["world_size"] == 2
    assert "seed0: training" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished          # not redone
    steps = [r["step"] for r in map(json.loads, (out / "seed1" / "log.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert max(steps) == MAX_STEPS
    for seed in (0, 1):
        assert (out / f"seed{seed}" / "eval-test" / "predictions.jsonl").is_file()

    summary = subprocess.run(_mmer("summarize", str(out), "--json"), env=run_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    s = json.loads((out / "summary.json").read_text())
    assert json.loads(summary.stdout) == s
    assert s["runs"] == 2 and s["split"] == "test" and s["metrics"]["macro_f1"]["n"] == 2
    lo, hi = s["metrics"]["macro_f1"]["ci95"]
    assert lo <= s["metrics"]["macro_f1"]["mean"] <= hi
    assert set(s["per_class"]) >= {"neutral", "angry"} and s["ensemble"]["members"] == 2
    assert s["other_splits"]["dev"]["selection"]["chosen_on_this_split"] == ["seed0", "seed1"]
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cmp = subprocess.run(_mmer("compare", str(out / "seed0" / "eval-test"), str(out / "seed1" / "eval-test"),
                               "--json", "--resamples", "2000"),
                         env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    r = json.loads(cmp.stdout)
    assert r["unit"] == "speaker" and r["units"] == 4 and r["n"] == 32      # test: actors 09-12, 8 clips each


@pytest.fixture(scope="module")
def ravdess_all_shards(ravdess_shards) -> Path:
    """The same 12 actors packed once with no fixed split (`--split none`): folds are chosen when training."""
    from mmer_dist.config import DataConfig

    if "folds" not in DataConfig.__dataclass_fields__:
        pytest.skip("data.folds / pack --split none (issue 19 item 1) are not on this branch yet")
    root = ravdess_shards.parent
    subprocess.run(_mmer("pack", "ravdess", "--root", str(root / "raw"), "--out", str(root / "all"), "--split", "none"),
                   check=True, env=run_env(), cwd=REPO, capture_output=True, timeout=300)
    return root / "all"


@pytest.mark.slow
def test_two_seeds_by_two_speaker_folds(ravdess_all_shards, tmp_path):
    """2 seeds x 2 speaker folds chosen at training time: each fold's test holds the other half of the actors,
    the summary pools the folds (every clip once per seed)."""
    out = tmp_path / "folds"
    cmd = _mmer("sweep", "--config", "debug", "--shards", str(ravdess_all_shards), "--out", str(out), "--seeds", "0,1",
                "--folds", "all", "data.folds=2", "data.dev_speakers=2", *TRAIN[:2], "train.max_steps=6",
                "train.eval_every=3")
    done = subprocess.run(cmd, env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["fold0_seed0", "fold0_seed1", "fold1_seed0", "fold1_seed1"]
    held_out = {}
    for fold in (0, 1):
        keys = [json.loads(line)["key"] for line in (out / f"fold{fold}_seed0" / "eval-test" / "predictions.jsonl")
                .read_text().splitlines()]
        held_out[fold] = {k.rsplit("-", 1)[1] for k in keys}            # the actors of the held-out fold
    assert held_out[0].isdisjoint(held_out[1]) and len(held_out[0] | held_out[1]) == 12
    summary = subprocess.run(_mmer("summarize", str(out), "--json"), env=run_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    s = json.loads(summary.stdout)
    assert s["runs"] == 4 and s["split"] == "test" and len(s["metrics"]["macro_f1"]["ci95"]) == 2
    assert s["pooled"]["seeds"] == 2 and s["pooled"]["n"] == 96                 # every clip tested once per seed
    assert s["ensemble"]["folds"] == 2 and s["ensemble"]["n"] == 96
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
