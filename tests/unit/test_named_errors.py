"""Every JSON/YAML file the project reads back names itself and the command that regenerates it when it is
damaged, and the commands print that without a traceback (exit 2); argument checks name their own field;
an empty RAVDESS wav falls back to the AV mp4's audio. Rows of docs/faults.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmer_dist.cli import main as cli_main
from mmer_dist.corpora import read_corpus
from mmer_dist.corpora.ravdess import EMPTY_AUDIO_FALLBACK
from mmer_dist.corpora.synthetic import write_corpus
from mmer_dist.jsonio import DamagedFileError, read_json, read_yaml
from mmer_dist.shards.schema import load_index, stats_name

# the arguments the session fixture `synth_meld_shards` was packed with (tests/conftest.py)
PACK_ARGS = ["--shard-samples", "20", "--video-size", "32", "--video-fps", "4"]


@pytest.fixture
def shards_copy(synth_meld_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the session's shards, free to damage."""
    return Path(shutil.copytree(synth_meld_shards, tmp_path / "shards"))


def _errors(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_read_json_and_read_yaml_name_the_file_what_is_wrong_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    with pytest.raises(FileNotFoundError, match=f"{path} not found; make it"):
        read_json(path, fix="make it")
    for text, problem in (('{"a": 1', "is not valid JSON"), ("[1, 2]", "holds list where an object"),
                          ("", "is not valid JSON")):
        path.write_text(text)
        with pytest.raises(DamagedFileError, match=f"{path} {problem}.*; run `mmer-dist pack`"):
            read_json(path, fix="run `mmer-dist pack`")
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DamagedFileError, match="is not UTF-8 text"):
        read_json(path, fix="x")
    path.write_text("[1]")
    assert read_json(path, fix="x", kind=list) == [1]
    yml = tmp_path / "c.yaml"
    yml.write_text("")
    assert read_yaml(yml, fix="x") == {}
    yml.write_text("a: [1,\n")
    with pytest.raises(DamagedFileError, match=f"{yml} is not valid YAML"):
        read_yaml(yml, fix="x")


def test_damaged_index_json_is_named_by_train_and_inspect(shards_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (shards_copy / "index.json").write_text('{"corpus": "meld", "splits": ')           # cut off mid-write
    assert cli_main(["train", "--config", "debug", "--shards", str(shards_copy), "--out", str(tmp_path / "r")]) == 2
    err = _errors(capsys)
    assert f"{shards_copy / 'index.json'} is not valid JSON" in err
    assert f"re-run the `mmer-dist pack` (or `embed`) command that wrote {shards_copy}" in err
    assert not (tmp_path / "r").exists()                                               # nothing started
    assert cli_main(["inspect", str(shards_copy)]) == 2
    assert f"{shards_copy / 'index.json'} is not valid JSON" in _errors(capsys)


def test_damaged_pack_json_is_named_by_pack_and_inspect(shards_copy: Path, synth_meld_raw: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.read_bytes() for p in shards_copy.glob("*.tar")}
    (shards_copy / "pack.json").write_text("{not json")
    assert cli_main(["pack", "meld", "--root", str(synth_meld_raw), "--out", str(shards_copy), *PACK_ARGS]) == 2
    err = _errors(capsys)
    assert f"{shards_copy / 'pack.json'} is not valid JSON" in err and "add --overwrite to re-pack" in err
    assert {p.name: p.read_bytes() for p in shards_copy.glob("*.tar")} == before      # no shard touched
    assert cli_main(["inspect", str(shards_copy)]) == 2
    assert "pack.json is not valid JSON" in _errors(capsys)


def test_damaged_stats_file_is_named_by_inspect_and_pack_and_the_fix_works(shards_copy: Path, synth_meld_raw: Path,
                                                       synth_meld_shards: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    shard = sorted(p.name for p in shards_copy.glob("meld-train-*.tar"))[1]
    stats = shards_copy / stats_name(shard)
    good = stats.read_bytes()
    stats.write_bytes(good[:40])                                    # truncated
    # training reads the compact index, not the stats files; inspect of an unmerged pack and the merge do
    (shards_copy / "index.json").unlink()                           # an unmerged (interrupted) pack
    assert cli_main(["inspect", str(shards_copy)]) == 2
    err = _errors(capsys)
    assert f"{stats} is not valid JSON" in err and f"delete it and {shard}, then re-run the same `mmer-dist pack`" in err
    pack_cmd = ["pack", "meld", "--root", str(synth_meld_raw), "--out", str(shards_copy), *PACK_ARGS]
    assert cli_main(pack_cmd) == 2                                  # the merge reads it
    assert f"{stats} is not valid JSON" in _errors(capsys)
    stats.unlink()                                                  # the fix the message names
    (shards_copy / shard).unlink()
    assert cli_main(pack_cmd) == 0
    assert stats.read_bytes() == good                               # the shard written again, the same bytes
    assert load_index(shards_copy).to_json() == load_index(synth_meld_shards).to_json()


def test_damaged_skipped_json_is_named_by_inspect(shards_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (shards_copy / "skipped.json").write_text("[]")
    assert cli_main(["inspect", str(shards_copy)]) == 2
    err = _errors(capsys)
    assert f"{shards_copy / 'skipped.json'} holds list where an object / mapping was expected" in err
    assert "re-run the same `mmer-dist pack` command" in err


def test_a_negative_max_steps_is_reported_as_itself(synth_meld_shards: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", "--config", "debug", "--shards", str(synth_meld_shards), "--out", str(tmp_path / "r"),
                     "train.max_steps=-5"]) == 2
    err = _errors(capsys)
    assert "train.max_steps=-5 must be >= 0 (0 = train.epochs x steps per epoch)" in err and "warmup" not in err


def test_empty_ravdess_wav_uses_the_av_mp4_audio_and_is_counted(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "raw"
    write_corpus("ravdess", root, n=8, seed=0, n_actors=1, seconds=(0.3, 0.4), frame_size=32, fps=5.0,
                 sample_rate=16000)
    wav = sorted(root.rglob("03-*.wav"))[0]
    wav.write_bytes(b"")
    utts, report = read_corpus("ravdess", root, test_actors=[1])
    (u,) = [u for u in utts if u.key.endswith(wav.stem[2:])]
    assert u.audio_path == u.video_path and u.audio_path.name.startswith("01-")       # the AV mp4
    assert report.degraded == {EMPTY_AUDIO_FALLBACK: 1} and str(wav) in report.examples[EMPTY_AUDIO_FALLBACK][0]
    out = tmp_path / "shards"
    assert cli_main(["pack", "ravdess", "--root", str(root), "--out", str(out), "--test-actors", "1",
                     "--video-size", "32"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"]["degraded"] == {EMPTY_AUDIO_FALLBACK: 1} and summary["skipped"]["total_dropped"] == 0
    test = summary["splits"]["test"]
    assert test["samples"] == 8 and test["modalities"]["audio"] == 8                # no audio was lost


def test_damaged_embed_json_is_named_by_embed(synth_meld_shards: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    (out / "embed.json").write_text('{"input": ')
    assert cli_main(["embed", "--config", "debug", "--shards", str(synth_meld_shards), "--out", str(out),
                     "data.modalities=[text]"]) == 2
    err = _errors(capsys)
    assert f"{out / 'embed.json'} is not valid JSON" in err and f"delete {out} and run `mmer-dist embed` again" in err
    assert [p.name for p in out.iterdir()] == ["embed.json"]                          # nothing written
