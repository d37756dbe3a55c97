"""Training end to end on CPU: in-process once, 2-process DDP and DeepSpeed ZeRO-2, 1-vs-2 parity,
kill + resume == uninterrupted (with and without the weight average), SIGTERM checkpoints and exits cleanly, bad configs fail early."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import log_records, run_env, torchrun, train_overrides
from mmer_dist.train.__main__ import main as train_main
from mmer_dist.train.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]


def _weights(run: Path, sub: str = "export") -> dict[str, torch.Tensor]:
    return load_file(str(run / sub / "model.safetensors"))


def test_train_in_process(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    rc = train_main(["--config", "debug", "--shards", str(synth_meld_shards), "--out", str(run),
                     *train_overrides("train.epochs=3", "optim.lr=3e-3")])
    assert rc == 0
    for name in ("config.yaml", "env.json", "log.jsonl", "metrics.json", "export/model.json", "best/model.json"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.*"))
    assert complete_checkpoints(run)
    losses = [r["loss"] for r in log_records(run)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and metrics["n"] > 0


def test_select_last_exports_the_final_weights(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--config", "debug", "--shards", str(synth_meld_shards), "--out", str(run),
                       *train_overrides("train.epochs=2", "train.eval_every=1", "train.select=last",
                                   "train.keep_checkpoints=1")]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # With these seeds the best dev Macro-F1 of the 16 evaluations is at step 5 (train.select=best picks it).
    assert metrics["best_step"] == metrics["steps"] == 16
    last = complete_checkpoints(run)[-1]
    final = load_file(str(last / "model.safetensors"))
    exported = _weights(run)
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)


def test_weight_average_is_what_evaluations_and_the_export_use(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--config", "debug", "--shards", str(synth_meld_shards), "--out", str(run),
                       *train_overrides("train.epochs=2", "train.select=last", "train.ema_decay=0.9",
                                   "train.keep_checkpoints=1")]) == 0
    last = complete_checkpoints(run)[-1]
    average = torch.load(last / "custom_checkpoint_0.pkl", weights_only=True)   # saved with the checkpoint
    assert average["updates"] == 16
    live, exported = load_file(str(last / "model.safetensors")), _weights(run)
    assert exported.keys() == live.keys()
    assert all(torch.equal(exported[k], average["shadow"][k]) for k in exported)
    assert not all(torch.equal(exported[k], live[k]) for k in exported)
    # the final evaluation (metrics.json) is of the average, as the last periodic one was
    final_eval = log_records(run, "dev")[-1]
    assert json.loads((run / "metrics.json").read_text())["macro_f1"] == pytest.approx(final_eval["macro_f1"])


def test_bad_configs_fail_before_any_process_group(synth_meld_shards, tmp_path, capsys):
    base = ["--config", "debug", "--out", str(tmp_path / "r")]
    assert train_main([*base, "--shards", str(synth_meld_shards), "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert train_main([*base, "--shards", str(synth_meld_shards), "train.epochs=two"]) == 2
    assert "must be an integer" in capsys.readouterr().err
    assert train_main([*base, "--shards", str(tmp_path / "missing")]) == 2
    assert "mmer-dist pack" in capsys.readouterr().err
    assert train_main([*base, "--shards", str(synth_meld_shards), "data.eval_split=nope"]) == 2
    assert "present:" in capsys.readouterr().err
    assert train_main([*base, "--shards", str(synth_meld_shards), "data.batch_size=64", "train.grad_accum=2"]) == 2
    assert "lower data.batch_size or train.grad_accum" in capsys.readouterr().err
    assert train_main([*base, "--shards", str(synth_meld_shards), "data.loader=stream",
                       "data.stream_resample=false", "data.num_workers=8"]) == 2
    assert "data.stream_resample=true" in capsys.readouterr().err
    assert train_main([*base, "--shards", str(synth_meld_shards), "train.deepspeed=nope.json"]) == 2
    assert "no such file" in capsys.readouterr().err
    zero3 = str(REPO / "launch" / "ds_zero3.json")
    assert train_main([*base, "--shards", str(synth_meld_shards), f"train.deepspeed={zero3}",
                       "train.ema_decay=0.99"]) == 2
    assert "ZeRO-3 partitions" in capsys.readouterr().err
    bad_json = tmp_path / "ds.json"
    bad_json.write_text("{stage: 2")
    assert train_main([*base, "--shards", str(synth_meld_shards), f"train.deepspeed={bad_json}"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(synth_meld_shards, tmp_path):
    """Same global batch (1 x 16 vs 2 x 8): the first losses agree; ranks end with identical weights."""
    common = ["--config", "debug", "--shards", str(synth_meld_shards), "train.max_steps=4",
              "train.eval_every=4", "train.checkpoint_every=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main([*common, "--out", str(one), *train_overrides("data.batch_size=16")]) == 0
    subprocess.run(torchrun(2, [*common, "--out", str(two), *train_overrides("data.batch_size=8")]),
                   check=True, env=run_env(), cwd=REPO, timeout=600)
    l1, l2 = [r["loss"] for r in log_records(one)], [r["loss"] for r in log_records(two)]
    assert len(l1) == len(l2) == 4
    assert l1[0] == pytest.approx(l2[0], rel=1e-4, abs=1e-5)
    assert l1 == pytest.approx(l2, rel=2e-3, abs=2e-4)
    state = json.loads((two / "train_state.json").read_text())
    assert len(set(state["param_checksums"])) == 1, state["param_checksums"]
    assert complete_checkpoints(two)


@pytest.mark.slow
def test_deepspeed_zero2_two_processes(synth_meld_shards, tmp_path):
    run = tmp_path / "ds"
    args = ["--config", "debug", "--shards", str(synth_meld_shards), "--out", str(run), "train.max_steps=6",
            "train.eval_every=6", "train.checkpoint_every=6", f"train.deepspeed={REPO / 'launch' / 'ds_zero2.json'}",
            *train_overrides("optim.lr=3e-3")]
    subprocess.run(torchrun(2, args), check=True, env=run_env(), cwd=REPO, timeout=600)
    assert "DEEPSPEED" in json.loads((run / "env.json").read_text())["distributed_type"]
    losses = [r["loss"] for r in log_records(run)]
    assert losses[-1] < losses[0], losses
    state = json.loads((run / "train_state.json").read_text())
    assert len(set(state["param_checksums"])) == 1
    assert complete_checkpoints(run) and (run / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["live-weights", "weight-average"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(synth_meld_shards, tmp_path, ema_decay):
    common = ["--config", "debug", "--shards", str(synth_meld_shards), "train.epochs=2",
              "train.checkpoint_every=2", "train.keep_checkpoints=10", *train_overrides(f"train.ema_decay={ema_decay}")]
    ref = tmp_path / "ref"
    assert train_main([*common, "--out", str(ref)]) == 0

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mmer_dist.train", *common, "--out", str(run)]
    proc = subprocess.Popen(cmd, env=run_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not complete_checkpoints(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert complete_checkpoints(run), "no checkpoint before the kill"
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    assert train_main([*common, "--out", str(run), "resume=latest"]) == 0
    a, b = _weights(ref, "export"), _weights(run, "export")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(synth_meld_shards, tmp_path):
    run = tmp_path / "term"
    cmd = [sys.executable, "-m", "mmer_dist.train", "--config", "debug", "--shards", str(synth_meld_shards),
           "--out", str(run), "train.epochs=50", "train.checkpoint_every=1000", *train_overrides()]
    proc = subprocess.Popen(cmd, env=run_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "checkpoint saved" in out
    assert complete_checkpoints(run)
    # and it continues from there
    assert train_main(["--config", "debug", "--shards", str(synth_meld_shards), "--out", str(run),
                       "train.epochs=50", "train.max_steps=" + str(_last_step(run) + 2), *train_overrides(),
                       "resume=latest"]) == 0


def _last_step(run: Path) -> int:
    return json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())["step"]
