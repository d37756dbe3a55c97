"""benchmarks/meld_decision_probe.py runs on a trained text model and prints every probe setting.

Run: .venv/bin/pytest tests/smoke/test_decision_probe.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mmer_dist.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[2]


def test_probe_prints_each_logit_shift_and_refit(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--config", "debug", "--shards", str(synth_meld_shards), "--out", str(run),
                       "data.modalities=[text]", "train.epochs=2", "optim.warmup_steps=2", "data.batch_size=8"]) == 0
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "meld_decision_probe.py"), "--model", str(run),
                          "--shards", str(synth_meld_shards)], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300).stdout
    scores = [float(x) for x in re.findall(r"dev Macro-F1 ([0-9.]+)", out)]
    assert len(scores) == 7 + 9, out                 # 7 logit shifts, 3 class weightings x 3 strengths
    assert all(0.0 <= x <= 1.0 for x in scores), out
    # tau=0 is the exported model's own decision: it equals the run's final dev Macro-F1
    tau0 = float(re.search(r"tau=\+0\.00: dev Macro-F1 ([0-9.]+)", out).group(1))
    assert abs(tau0 - json.loads((run / "metrics.json").read_text())["macro_f1"]) < 1e-3, out
