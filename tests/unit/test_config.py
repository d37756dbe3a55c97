"""Config system: defaults, presets holding only differences, dotted overrides, validation messages."""

from __future__ import annotations

import re

import pytest
import yaml

from mmer_dist.config import Config, ConfigError
from mmer_dist.presets import config_from_file, dump_config, load_config, save_config


def test_defaults_build_and_round_trip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, Config)
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_file(tmp_path / "config.yaml") == cfg


def test_preset_holds_only_differences():
    cfg = load_config("debug")
    assert cfg.name == "debug"
    assert cfg.model.fusion.width == 32
    # untouched fields keep their defaults
    assert cfg.optim.weight_decay == Config().optim.weight_decay


def test_dotted_overrides_parse_types():
    cfg = load_config("debug", ["optim.lr=3e-4", "data.modalities=[text, audio]", "train.epochs=5",
                                "sampler.weighting=inverse", "model.text.freeze=true",
                                "sampler.class_weights={fear: 4.0}", "optim.betas=[0.9, 0.98]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.modalities == ("text", "audio")
    assert cfg.train.epochs == 5 and cfg.sampler.weighting == "inverse"
    assert cfg.model.text.freeze is True
    assert cfg.sampler.class_weights == {"fear": 4.0}
    assert cfg.optim.betas == (0.9, 0.98)


def test_comma_list_override():
    assert load_config(None, ["data.modalities=text,video"]).data.modalities == ("text", "video")


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(None, ["optim.lrr=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs must be an integer"):
        load_config(None, ["train.epochs=abc"])


@pytest.mark.parametrize("override, message", [
    ("sampler.weighting=balanced", "sampler.weighting='balanced' is not valid"),
    ("fusion.width=1", "unknown config key"),
    ("model.fusion.width=30", "model.fusion.width=30 must be divisible by model.fusion.heads=4"),
    ("data.modalities=[smell]", "data.modalities item='smell'"),
    ("sampler.weighting=manual", "needs sampler.class_weights"),
    ("train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
    ("optim.encoder_lr=-1", "optim.encoder_lr=-1.0 must be >= 0"),
    ("train.eval_every=-2", "train.eval_every=-2 must be >= 0 (0 = at the end of every epoch)"),
    ("model.audio.dim=-3", "model.audio: dim=-3 must be >= 0"),
    ("model.text.kind=cnn", "model.text: kind='cnn' is not valid; choose one of hf, scratch, cached"),
    ("data.modalities=[text", "not valid YAML; quote it or fix the brackets"),
])
def test_validation_messages_say_what_to_change(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_data_modalities_must_have_an_encoder():
    with pytest.raises(ConfigError, match="model.modalities"):
        load_config(None, ["model.modalities=[text]"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*debug"):
        load_config("no_such_preset")


def test_yaml_preset_with_base(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump({"base": "debug", "optim": {"lr": 0.5}}))
    cfg = load_config(str(p))
    assert cfg.optim.lr == 0.5 and cfg.model.fusion.width == 32 and cfg.name == "mine"


def test_dump_is_yaml_of_everything():
    text = dump_config(load_config("debug"))
    data = yaml.safe_load(text)
    assert set(data) == {"name", "data", "sampler", "model", "loss", "optim", "train"}


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_global_batch_derives_the_per_rank_batch_and_accumulation():
    from mmer_dist.presets import load_config
    from mmer_dist.train.preflight import resolve_for_world

    cfg = load_config("debug", ["data.global_batch_size=32", "data.batch_size=16"])
    got = {w: (c.data.batch_size, c.train.grad_accum) for w in (1, 2, 4, 8, 32)
           for c in [resolve_for_world(cfg, w)]}
    assert got == {1: (16, 2), 2: (16, 1), 4: (8, 1), 8: (4, 1), 32: (1, 1)}
    assert all(b * a * w == 32 for w, (b, a) in got.items())
    with pytest.raises(ConfigError, match="does not divide over 3 process"):
        resolve_for_world(cfg, 3)
    with pytest.raises(ConfigError, match="leave train.grad_accum at 1"):
        resolve_for_world(load_config("debug", ["data.global_batch_size=32", "train.grad_accum=2"]), 1)
    assert resolve_for_world(load_config("debug"), 4).data.batch_size == 8          # off: per-rank as given
def test_a_negative_length_names_its_own_field_not_the_warmup():
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["train.max_steps=-5"])
    assert str(e.value) == "train.max_steps=-5 must be >= 0 (0 = train.epochs x steps per epoch)"
    assert "warmup" not in str(e.value)


def test_a_damaged_preset_or_config_yaml_names_the_file(tmp_path):
    from mmer_dist.jsonio import DamagedFileError

    bad = tmp_path / "mine.yaml"
    bad.write_text("optim: {lr: [1e-3\n")
    with pytest.raises(DamagedFileError, match=re.escape(str(bad)) + " is not valid YAML .*a preset is a YAML mapping"):
        load_config(str(bad))
    run_config = tmp_path / "config.yaml"
    run_config.write_text("- just\n- a list\n")
    with pytest.raises(DamagedFileError, match=re.escape(f"{run_config} holds list where an object / mapping was "
                                                         f"expected; it is the config of the run that wrote it")):
        config_from_file(run_config)
