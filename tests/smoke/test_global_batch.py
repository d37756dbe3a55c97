"""A preset stated in a global batch means the same optimisation on 1 and 2 processes: same first losses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmer_dist.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[2]
PRESET = """base: debug
data: {modalities: [text, audio], global_batch_size: 16, batch_size: 16}
model: {fusion: {dropout: 0.0}, text: {dropout: 0.0}, audio: {dropout: 0.0}}
optim: {warmup_steps: 2}
train: {max_steps: 4, eval_every: 4, checkpoint_every: 4, log_every: 1}
"""


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if r["split"] == "train" and "loss" in r]


@pytest.mark.slow
def test_first_losses_of_one_and_two_processes_agree_at_one_preset(synth_meld_shards, tmp_path):
    preset = tmp_path / "global16.yaml"
    preset.write_text(PRESET)
    args = ["--config", str(preset), "--shards", str(synth_meld_shards)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main([*args, "--out", str(one)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(port), "-m", "mmer_dist.train", *args, "--out", str(two)], check=True, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 4
    assert l1[0] == pytest.approx(l2[0], rel=1e-4, abs=1e-5)
    assert l1 == pytest.approx(l2, rel=2e-3, abs=2e-4)
    import yaml

    resolved = [yaml.safe_load((r / "config.yaml").read_text())["data"]["batch_size"] for r in (one, two)]
    assert resolved == [16, 8]                   # what each process count trained with, recorded
