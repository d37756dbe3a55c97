"""slurm/sweep.sbatch on the test cluster: `mmer-dist sweep --slurm` submits one array task per unfinished
run, each task trains and evaluates its run as a local sweep would (logs in the sweep folder); submitting
the finished sweep again submits nothing; the summary has both runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


TRAIN = ["data.modalities=[text,audio]", "train.max_steps=6", "train.eval_every=3", "optim.warmup_steps=2"]
SITE = "--cpus-per-task=1 --mem-per-cpu=1500M"        # the test cluster's flags, as a site passes its own


def test_sweep_as_a_job_array(slurm: Any, tmp_path: Path) -> None:
    raw, shards, out = tmp_path / "raw", tmp_path / "shards", tmp_path / "sweep"
    slurm.run("mmer-dist", "synth", "ravdess", "--out", str(raw), "--n", "96", "--no-video", timeout=120)
    slurm.run("mmer-dist", "pack", "ravdess", "--root", str(raw), "--out", str(shards), timeout=300)
    sweep = ["mmer-dist", "sweep", "--config", "debug", "--shards", str(shards), "--out", str(out), "--seeds", "0,1",
             "--slurm", "--sbatch", SITE, *TRAIN]
    printed = slurm.run(*sweep, timeout=120)
    job = re.search(r"submitted job array (\d+): 2 of 2 runs", printed)
    assert job, printed
    states = {j["ArrayTaskId"]: j["JobState"] for j in slurm.wait(job[1], timeout=900)}
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(out.glob("slurm-*.out")))
    assert states == {"0": "COMPLETED", "1": "COMPLETED"}, logs
    assert sorted(p.name for p in out.glob("slurm-*.out")) == [f"slurm-{job[1]}_0.out", f"slurm-{job[1]}_1.out"]
    for seed in (0, 1):
        run = out / f"seed{seed}"
        assert json.loads((run / "metrics.json").read_text())["split"] == "dev"
        assert (run / "eval-test" / "predictions.jsonl").is_file()
    assert "all 2 runs finished" in slurm.run(*sweep, timeout=120)       # nothing left to submit
    summary = json.loads(slurm.run("mmer-dist", "summarize", str(out), "--json", timeout=120))
    assert summary["runs"] == 2 and len(summary["metrics"]["macro_f1"]["ci95"]) == 2
