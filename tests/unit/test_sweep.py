"""`mmer-dist sweep` without training: the grid, its names and commands, sweep.json and the same-sweep
guard, the Slurm submission (a fake sbatch on PATH) and task selection, finished runs skipped."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmer_dist import cli
from mmer_dist.experiments import sweep as sw


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--config", "debug", "--shards", str(shards), "--out", str(out), *extra]


def _plan(shards: Path, out: Path, *extra: str) -> sw.Plan:
    args = sw.build_parser().parse_args(_args(shards, out, *extra)[1:])
    return sw.build_plan(sw.identity_from_args(args), Path(args.out).resolve())


def _finish(plan: sw.Plan, run: sw.RunSpec) -> None:
    """Leave a run folder as a finished training + test evaluation leaves it."""
    d = plan.run_dir(run)
    (d / "export").mkdir(parents=True)
    (d / "export" / "model.json").write_text("{}")
    (d / "metrics.json").write_text("{}")
    plan.eval_dir(run).mkdir()
    for name in ("metrics.json", "predictions.jsonl"):
        (plan.eval_dir(run) / name).write_text("{}")


def test_grid_names_and_commands(synth_meld_shards, tmp_path):
    plan = _plan(synth_meld_shards, tmp_path / "sw", "--seeds", "0,1", "train.max_steps=2",
                 "optim.lr=1e-3", "optim.lr=3e-4")
    assert [r.name for r in plan.runs] == ["optim.lr=1e-3_seed0", "optim.lr=1e-3_seed1",
                                           "optim.lr=3e-4_seed0", "optim.lr=3e-4_seed1"]
    run = plan.runs[3]
    train = plan.train_command(run)
    assert train[:3] == [sys.executable, "-m", "mmer_dist.train"]
    assert train[3:] == ["--config", "debug", "--shards", str(synth_meld_shards), "--out", str(plan.run_dir(run)),
                         "train.max_steps=2", "optim.lr=3e-4", "train.seed=1"]
    assert plan.train_command(run, resume=True)[-1] == "resume=latest"
    assert plan.eval_command(run)[1:] == ["-m", "mmer_dist.evaluate", "--model", str(plan.run_dir(run)), "--shards",
                                          str(synth_meld_shards), "--split", "test", "--out",
                                          str(plan.run_dir(run) / "eval-test")]
    torchrun = _plan(synth_meld_shards, tmp_path / "t", "--seeds", "0", "--launcher", "torchrun --nproc_per_node 2")
    assert torchrun.train_command(torchrun.runs[0])[:5] == ["torchrun", "--nproc_per_node", "2", "-m", "mmer_dist.train"]


def test_bad_arguments_fail_before_any_run(synth_meld_shards, tmp_path, capsys):
    cases = [(["train.seed=3"], "use --seeds"), (["resume=latest"], "resumes by itself"),
             (["optim.lrr=1"], "did you mean 'optim.lr'"), (["--seeds", "0,x"], "comma-separated integers"),
             (["--folds", "all"], "--folds all needs the number of folds: add data.folds=K")]
    for extra, message in cases:
        assert cli.main(_args(synth_meld_shards, tmp_path / "sw", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "sw").exists()


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` on PATH that records its arguments and answers with a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.args"
    script = bin_dir / "sbatch"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho 4242\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_slurm_submits_the_unfinished_runs_and_tasks_pick_theirs(synth_meld_shards, tmp_path, fake_sbatch, capsys,
                                                                 monkeypatch):
    out = tmp_path / "sw"
    plan = _plan(synth_meld_shards, out, "--seeds", "0,1,2")
    out.mkdir()
    _finish(plan, plan.runs[1])
    assert cli.main(_args(synth_meld_shards, out, "--seeds", "0,1,2", "--slurm", "--sbatch", "--cpus-per-task=1 -p debug")) == 0
    assert fake_sbatch.read_text().split() == ["--parsable", "--array=0,2", f"--output={out.resolve()}/slurm-%A_%a.out",
                                               "--cpus-per-task=1", "-p", "debug", str(sw.SBATCH), "--out",
                                               str(out.resolve())]
    assert "submitted job array 4242: 2 of 3 runs" in capsys.readouterr().out
    recorded = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in recorded["runs"]] == ["seed0", "seed1", "seed2"]
    assert recorded["runs"][2]["train"].endswith("train.seed=2") and recorded["test_split"] == "test"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert cli.main(["sweep", "--out", str(out), "--task"]) == 0
    assert "seed1 already finished" in capsys.readouterr().out
    assert cli.main(["sweep", "--out", str(out), "--task", "7"]) == 2
    assert "task '7' is not a run of" in capsys.readouterr().err


def test_another_sweep_in_the_same_folder_is_refused(synth_meld_shards, tmp_path, fake_sbatch, capsys):
    out = tmp_path / "sw"
    assert cli.main(_args(synth_meld_shards, out, "--seeds", "0,1", "--slurm", "train.max_steps=3")) == 0
    capsys.readouterr()
    assert cli.main(_args(synth_meld_shards, out, "--seeds", "0,1,2", "train.max_steps=3")) == 2
    err = capsys.readouterr().err
    assert "holds another sweep (seeds: [0, 1] there, [0, 1, 2] now)" in err
    assert f"--out {out.resolve()} --seeds 0,1 train.max_steps=3" in err and "choose a new --out" in err


def test_finished_runs_are_skipped(synth_meld_shards, tmp_path, capsys):
    out = tmp_path / "sw"
    plan = _plan(synth_meld_shards, out, "--seeds", "0,1")
    out.mkdir()
    for run in plan.runs:
        _finish(plan, run)
    assert cli.main(_args(synth_meld_shards, out, "--seeds", "0,1")) == 0
    printed = capsys.readouterr().out
    assert "2 runs, 2 finished, 0 to run" in printed and "$ " not in printed


def test_a_run_folder_still_in_use_is_refused(synth_meld_shards, tmp_path, capsys):
    """Ranks that outlived a killed sweep (torchrun starts them in their own sessions) still write to
    their run folder: a re-run must not start a second training there."""
    out = tmp_path / "sw"
    run_dir = out.resolve() / "seed0"
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--out", str(run_dir)])
    try:
        deadline = time.monotonic() + 10
        while sw.processes_using(run_dir) != [leftover.pid]:     # until the child has exec'd
            assert time.monotonic() < deadline, sw.processes_using(run_dir)
            time.sleep(0.05)
        assert cli.main(_args(synth_meld_shards, out, "--seeds", "0")) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by processes [{leftover.pid}]" in err and f"kill {leftover.pid}" in err
    finally:
        leftover.kill()
        leftover.wait()
    assert sw.processes_using(run_dir) == []


def test_a_run_inside_a_slurm_task_is_a_world_of_its_own(monkeypatch):
    """srun's task layout would make the training join a process group at the head node's port 29500,
    which two array tasks on one node both claim (measured on the test cluster: EADDRINUSE)."""
    for k, v in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "17"}.items():
        monkeypatch.setenv(k, v)
    env = sw.child_env()
    assert not {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"} & env.keys()
    assert env["SLURM_JOB_ID"] == "17"          # the training still requeues its own job


def test_fold_plumbing(monkeypatch):
    """--folds passes data.fold=i per run (data.folds=K comes from the overrides or the preset); the
    config fields themselves are validated by load_config when the plan is built."""
    run = sw._run_spec({"optim.lr": "3e-4"}, 1, 0, ["data.folds=2"])
    assert run.name == "optim.lr=3e-4_fold1_seed0"
    assert run.overrides == ["data.folds=2", "optim.lr=3e-4", "train.seed=0", "data.fold=1"]
    assert sw.resolve_folds("", "debug", []) is None
    assert sw.resolve_folds("2,0", "debug", []) == [2, 0]
    monkeypatch.setattr(sw, "_fold_count", lambda config, fixed: 5 if "data.folds=5" in fixed else 0)
    assert sw.resolve_folds("all", "ravdess_audio", ["data.folds=5"]) == [0, 1, 2, 3, 4]
    with pytest.raises(sw.SweepError, match="add data.folds=K"):
        sw.resolve_folds("all", "ravdess_audio", [])
