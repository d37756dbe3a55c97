"""The resume guard without training: what may change, what is refused, the record of each start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmer_dist.config import ConfigError
from mmer_dist.presets import load_config, save_config
from mmer_dist.train.checkpoint import TRAINER_STATE, checkpoint_dir
from mmer_dist.train.resume import MAY_CHANGE, config_diff, flatten, plan_resume, record_start


def _run_with_checkpoint(tmp_path: Path, step: int = 6) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("debug"), run / "config.yaml")
    ckpt = checkpoint_dir(run, step)
    ckpt.mkdir(parents=True)
    (ckpt / TRAINER_STATE).write_text(json.dumps({"step": step, "epoch": 0}))
    return run


def test_flatten_and_diff_use_dotted_keys_and_compare_shard_paths_resolved(tmp_path, monkeypatch):
    keys = flatten(load_config("debug"))
    assert {"model.fusion.width", "model.text.kind", "optim.lr", "train.epochs", "data.shards"} <= set(keys)
    assert set(MAY_CHANGE) <= set(keys)
    monkeypatch.chdir(tmp_path)
    a = load_config("debug", ["data.shards=shards/x", "optim.lr=0.01"])
    b = load_config("debug", [f"data.shards={tmp_path / 'shards' / 'x'}", "optim.lr=0.02"])
    assert config_diff(a, b) == {"optim.lr": [0.01, 0.02]}        # the same shards folder, spelled two ways


def test_a_longer_run_and_new_cadences_are_planned_and_recorded(tmp_path, capsys):
    run = _run_with_checkpoint(tmp_path)
    cfg = load_config("debug", ["train.resume=latest", "train.epochs=4", "train.eval_every=5", "train.log_every=2"])
    plan = plan_resume(cfg, run)
    assert plan.checkpoint == checkpoint_dir(run, 6) and plan.step == 6 and not plan.first
    assert plan.changed == {"train.epochs": [1, 4], "train.eval_every": [0, 5], "train.log_every": [1, 2]}
    config_before = (run / "config.yaml").read_bytes()
    notes = record_start(run, cfg, plan)
    assert (run / "config.yaml").read_bytes() == config_before
    (entry,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert entry["step"] == 6 and entry["changed"] == plan.changed and entry["checkpoint"] == str(plan.checkpoint)
    assert any("keeps the length the run started with" in n for n in notes)


@pytest.mark.parametrize("override, key", [("model.fusion.width=64", "model.fusion.width"),
                                           ("sampler.weighting=inverse", "sampler.weighting"),
                                           ("loss.name=focal", "loss.name"), ("train.seed=3", "train.seed"),
                                           ("data.modalities=[text]", "data.modalities")])
def test_a_key_outside_may_change_is_refused_with_both_values(tmp_path, override, key):
    run = _run_with_checkpoint(tmp_path)
    with pytest.raises(ConfigError) as e:
        plan_resume(load_config("debug", ["train.resume=latest", override]), run)
    assert f"\n  {key}: " in str(e.value) and "in config.yaml" in str(e.value) and "new --out" in str(e.value)


def test_a_fresh_start_into_a_folder_of_another_config_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("debug"), run / "config.yaml")          # an earlier start, killed before a checkpoint
    with pytest.raises(ConfigError, match="an earlier start of .* which left no checkpoint"):
        plan_resume(load_config("debug", ["model.fusion.layers=2"]), run)
    same = plan_resume(load_config("debug"), run)                   # the same config: a restart, recorded
    assert same.checkpoint is None and not same.first
    record_start(run, load_config("debug"), same)
    assert json.loads((run / "resumes.jsonl").read_text())["step"] == 0


def test_a_checkpoint_without_its_config_is_refused(tmp_path):
    run = _run_with_checkpoint(tmp_path)
    os.remove(run / "config.yaml")
    with pytest.raises(ConfigError, match="config.yaml not found: the config of .* is unknown"):
        plan_resume(load_config("debug", ["train.resume=latest"]), run)
