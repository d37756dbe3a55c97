"""Data accounting with real processes: skip counts summed over 2 ranks; an epoch stopped on 2 ranks and
resumed on 1 or on 3 draws exactly the samples of the uninterrupted 2-rank epoch (its digest in log.jsonl)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import make_samples, run_env, torchrun, write_shards
from mmer_dist.train.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--config", "debug", "data.modalities=[text,audio]", "model.fusion.dropout=0.0", "train.log_every=1",
          "optim.warmup_steps=1", "data.batch_size=2", "train.epochs=2", "train.checkpoint_every=4"]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _epoch_end(run: Path, epoch: int) -> dict:
    return [r for r in _records(run) if r.get("epoch_end") == epoch][-1]


@pytest.mark.slow
def test_skip_counts_are_summed_over_two_ranks(tmp_path):
    root = write_shards(tmp_path / "s", {"train": make_samples("train", 40, corrupt=(3, 17, 30)),
                                        "dev": make_samples("dev", 10, seed=1)}, per_shard=5)
    run = tmp_path / "run"
    subprocess.run(torchrun(2, [*COMMON, "--shards", str(root), "--out", str(run), "train.epochs=1",
                                 "data.max_skip_fraction=0.5"]), check=True, env=run_env(), cwd=REPO, timeout=600)
    metrics = json.loads((run / "metrics.json").read_text())
    # weighting none: one epoch is a permutation of the 40 samples over 2 ranks x 10 batches of 2 = all 40
    assert metrics["train_data"] == {"read": 40, "skipped": {"audio_corrupt": 3}, "degraded": {}}
    assert _epoch_end(run, 0)["samples"] == 40


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [1, 3])
def test_epoch_stopped_on_two_ranks_resumed_on_another_number_draws_the_same_samples(synth_meld_shards, tmp_path,
                                                                                     new_world):
    args = [*COMMON, "--shards", str(synth_meld_shards), "sampler.weighting=sqrt_inverse"]
    ref = tmp_path / "ref"
    subprocess.run(torchrun(2, [*args, "--out", str(ref)]), check=True, env=run_env(), cwd=REPO, timeout=600)

    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun(2, [*args, "--out", str(run)]), env=run_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").exists() and any(r.get("split") == "train" for r in _records(run)):
            break
        time.sleep(0.02)
    # torchrun forwards SIGTERM to both ranks and waits for them (then exits 1 itself): the ranks checkpoint
    # at the next step and stop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "checkpoint saved" in err or complete_checkpoints(run), err[-3000:]
    state = json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and 0 < state["batches_in_epoch"], state        # stopped mid-epoch 0

    subprocess.run(torchrun(new_world, [*args, "--out", str(run), "resume=latest"]), check=True, env=run_env(),
                   cwd=REPO, timeout=900)
    got, want = _epoch_end(run, 0), _epoch_end(ref, 0)
    assert (got["samples"], got["digest"]) == (want["samples"], want["digest"])
    assert json.loads((run / "metrics.json").read_text())["train_data"]["read"] > 0
