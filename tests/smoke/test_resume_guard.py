"""A resumed run keeps its config (refusals name the file, the keys and the fix; config.yaml is never
rewritten; resumes.jsonl records what a resume may change), `resume=latest|must` without a checkpoint,
the learning rate of every parameter group in log.jsonl / TensorBoard / curves.png, eval and predict of
a checkpoint folder, predict refusing inputs it cannot use, damaged run files named. Rows of docs/faults.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmer_dist.cli import main as cli_main
from mmer_dist.corpora.synthetic_media import write_wav
from mmer_dist.plots import agg_figure, save_png
from mmer_dist.report import plot_curves
from mmer_dist.train.__main__ import main as train_main
from mmer_dist.train.checkpoint import complete_checkpoints, load_exported

COMMON = ["--config", "debug", "data.modalities=[text,audio]", "train.log_every=1", "optim.warmup_steps=1",
          "train.checkpoint_every=2", "train.keep_checkpoints=10"]


def _train(shards: Path, run: Path, *extra: str) -> int:
    return train_main([*COMMON, "--shards", str(shards), "--out", str(run), *extra])


@pytest.fixture(scope="module")
def run4(synth_meld_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run, checkpoints at steps 2 and 4 (never modified: tests copy it)."""
    run = tmp_path_factory.mktemp("guard") / "run"
    assert _train(synth_meld_shards, run, "train.max_steps=4") == 0
    return run


@pytest.fixture
def run(run4: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run4, tmp_path / "run"))


def _log(run: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["split"] == split]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("override, line", [
    ("model.fusion.width=48", "  model.fusion.width: 32 in config.yaml, 48 now"),
    ("optim.lr=5e-3", "  optim.lr: 0.001 in config.yaml, 0.005 now"),
])
def test_resume_refuses_a_key_the_run_cannot_change(run, synth_meld_shards, capsys, override, line):
    before = _snapshot(run)
    assert _train(synth_meld_shards, run, "train.max_steps=4", "resume=latest", override) == 2
    err = capsys.readouterr().err
    newest = complete_checkpoints(run)[-1]
    assert f"mmer-dist train: {run / 'config.yaml'} is the config of the run that wrote {newest}" in err
    assert f"\n{line}\n" in err
    assert "Use the run's values (drop these overrides, or pass the run's --config), or train into a new --out" in err
    assert "Traceback" not in err and "size mismatch" not in err
    assert _snapshot(run) == before               # config.yaml, checkpoints, logs: nothing touched, nothing added


@pytest.mark.parametrize("first, longer, key", [("train.max_steps=4", "train.max_steps=7", "train.max_steps"),
                                                 ("train.epochs=1", "train.epochs=2", "train.epochs")])
def test_a_longer_resume_is_applied_recorded_and_trains_at_the_schedule_floor(synth_meld_shards, tmp_path, capsys,
                                                                              first, longer, key):
    run = tmp_path / "run"
    assert _train(synth_meld_shards, run, first) == 0
    built_for = max(r["step"] for r in _log(run))             # the length the schedule was built for
    config_before = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert _train(synth_meld_shards, run, longer, "resume=latest") == 0
    out = capsys.readouterr().out
    before, now = first.split("=")[1], longer.split("=")[1]
    assert f"this start changes {key} {before} -> {now}" in out and "learning-rate schedule keeps the length" in out
    assert (run / "config.yaml").read_bytes() == config_before              # the original config, kept
    (entry,) = map(json.loads, (run / "resumes.jsonl").read_text().splitlines())
    assert entry["step"] == built_for and entry["checkpoint"].endswith(f"checkpoints/step-{built_for:06d}")
    assert entry["changed"] == {key: [int(before), int(now)]} and entry["time"]
    rows = {r["step"]: r for r in _log(run)}
    total = json.loads((run / "train_state.json").read_text())["step"]
    assert total > built_for and sorted(rows) == list(range(1, total + 1))
    # past the steps the schedule was built for, every group stays at its floor: lr x min_lr_ratio (0.1)
    for step in range(built_for + 1, total + 1):
        assert rows[step]["lr/fusion"] == pytest.approx(1e-3 * 0.1) and rows[step]["lr/text"] == pytest.approx(1e-5)


def test_resume_latest_without_a_checkpoint_starts_fresh_and_must_refuses(synth_meld_shards, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert _train(synth_meld_shards, fresh, "train.max_steps=2", "resume=latest") == 0
    out = capsys.readouterr().out
    assert f"resume=latest: no checkpoint in {fresh / 'checkpoints'} yet; starting a fresh run" in out
    assert (fresh / "config.yaml").exists() and not (fresh / "resumes.jsonl").exists()
    missing = tmp_path / "missing"
    assert _train(synth_meld_shards, missing, "train.max_steps=2", "resume=must") == 2
    err = capsys.readouterr().err
    assert f"train.resume=must: {missing} has no complete checkpoint" in err and "resume=latest to start fresh" in err
    assert not missing.exists()


def test_every_parameter_group_has_its_learning_rate_in_the_log_tensorboard_and_curves(run4, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _log(run4)
    assert all({"lr/fusion", "lr/text", "lr/audio"} <= set(r) and "lr" not in r for r in rows)
    assert max(r["lr/fusion"] for r in rows) == pytest.approx(1e-3)          # optim.lr: fusion and head
    assert max(r["lr/text"] for r in rows) == pytest.approx(1e-4)            # optim.encoder_lr
    tb = EventAccumulator(str(run4 / "tb"))
    tb.Reload()
    assert {"train/lr/fusion", "train/lr/text", "train/lr/audio"} <= set(tb.Tags()["scalars"])
    assert [e.value for e in tb.Scalars("train/lr/fusion")] == pytest.approx([r["lr/fusion"] for r in rows])
    fig = plot_curves(run4, tmp_path / "curves.png")
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert sorted(lines) == ["audio", "fusion", "text"]
    assert max(lines["fusion"].get_ydata()) == pytest.approx(1e-3) and max(lines["text"].get_ydata()) == pytest.approx(1e-4)


def test_eval_and_predict_accept_a_checkpoint_folder(run4, synth_meld_shards, tmp_path, capsys):
    last = complete_checkpoints(run4)[-1]               # step 4: the weights the run exported
    from_ckpt, from_export = load_exported(last)[0].state_dict(), load_exported(run4)[0].state_dict()
    assert from_ckpt.keys() == from_export.keys() and all(torch.equal(from_ckpt[k], from_export[k]) for k in from_ckpt)
    for model, out in ((last, tmp_path / "ckpt"), (run4, tmp_path / "run")):
        assert cli_main(["eval", "--model", str(model), "--shards", str(synth_meld_shards), "--split", "dev",
                         "--out", str(out)]) == 0
    ckpt_metrics, run_metrics = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ckpt", "run"))
    assert ckpt_metrics.pop("model") == str(last)
    run_metrics.pop("model")
    assert ckpt_metrics.pop("selected_on") is None and run_metrics.pop("selected_on") == "dev"   # a step vs the best
    assert ckpt_metrics == run_metrics
    assert (tmp_path / "ckpt" / "curves.png").exists()              # the run folder's log, found from the checkpoint
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(complete_checkpoints(run4)[0]), "--text", "so happy", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["probabilities"]) == set(load_exported(run4)[3])


def test_predict_refuses_an_input_it_cannot_use(run4, tmp_path, capsys):
    png = tmp_path / "plot.png"
    save_png(agg_figure(2, 2), png)
    wav = write_wav(tmp_path / "x.wav", 0.3 * np.sin(np.arange(16000) / 8.0), 16000)
    assert cli_main(["predict", "--model", str(run4), "--audio", str(png)]) == 2
    assert f"mmer-dist predict: --audio {png}: no audio could be decoded from it (it holds video (png))" in \
        capsys.readouterr().err
    assert cli_main(["predict", "--model", str(run4), "--video", str(wav)]) == 2
    assert f"--video {wav}: no video stream (it holds audio (pcm_s16le)); it is audio: pass it as --audio" in \
        capsys.readouterr().err
    assert cli_main(["predict", "--model", str(run4), "--audio", str(wav)]) == 0          # the same file, rightly
    assert "(from audio)" in capsys.readouterr().out


def test_damaged_run_files_are_named_with_the_fix(run, synth_meld_shards, tmp_path, capsys):
    newest = complete_checkpoints(run)[-1]
    (newest / "trainer_state.json").write_text('{"step": 4, "epo')
    assert _train(synth_meld_shards, run, "train.max_steps=4", "resume=latest") == 2
    err = capsys.readouterr().err
    assert f"{newest / 'trainer_state.json'} is not valid JSON" in err and f"delete {newest} and resume from" in err
    shutil.rmtree(newest)                                           # the fix: the checkpoint before it is complete
    assert _train(synth_meld_shards, run, "train.max_steps=4", "resume=latest") == 0
    assert json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])["step"] == 2
    (run / "config.yaml").write_text("data: [unclosed\n")
    assert _train(synth_meld_shards, run, "train.max_steps=4", "resume=latest") == 2
    assert f"{run / 'config.yaml'} is not valid YAML" in capsys.readouterr().err
    (run / "export" / "model.json").write_text("")
    assert cli_main(["eval", "--model", str(run), "--shards", str(synth_meld_shards), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'export' / 'model.json'} is not valid JSON" in err and "evaluate one of the run's checkpoints" in err
    shards = Path(shutil.copytree(synth_meld_shards, tmp_path / "shards"))
    (shards / "index.json").write_text("{")
    assert cli_main(["eval", "--model", str(run / "best"), "--shards", str(shards), "--out", str(tmp_path / "e")]) == 2
    assert f"{shards / 'index.json'} is not valid JSON" in capsys.readouterr().err
