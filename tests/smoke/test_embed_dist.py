"""Embedding cache end to end on CPU: 1 vs 2 processes give byte-identical embedding shards, a
SIGKILLed embed resumes to the uninterrupted bytes, training on embeddings follows training the
same frozen encoders on media (same losses up to fp16 rounding, same dev metrics), and a config
expecting another encoder is refused before training."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmer_dist.presets import load_config
from mmer_dist.embed import embed
from mmer_dist.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[2]
ALL = ["data.modalities=[text,audio,video]", "data.max_audio_seconds=10.0", "model.text.pooling=mean"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")}


def test_one_and_two_processes_write_identical_embedding_shards(synth_meld_shards: Path, tmp_path: Path):
    args = ["--config", "debug", "--shards", str(synth_meld_shards), *ALL]
    one = subprocess.run([sys.executable, "-m", "mmer_dist.embed", *args, "--out", str(tmp_path / "one")],
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "mmer_dist.embed", *args, "--out", str(tmp_path / "two")],
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert "index.json" in a and len([n for n in a if n.endswith(".tar")]) >= 6
    assert a == b
    import tarfile

    keys = []
    for tar in sorted((tmp_path / "two").glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += sorted({m.name.split(".")[0] for m in tf.getmembers()})
    assert len(keys) == len(set(keys)) == sum(si["samples"] for si in
                                                 json.loads(_inspect(tmp_path / "two"))["splits"].values())
    assert "train on them with" in two.stdout and two.stdout.count("shards planned") == 1   # main rank prints


def _inspect(path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "mmer_dist.cli", "inspect", str(path), "--json"], env=_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_sigkill_then_resume_equals_uninterrupted(synth_meld_raw: Path, tmp_path: Path):
    from mmer_dist.shards.pack import pack

    media = tmp_path / "media"
    pack("meld", synth_meld_raw, media, shard_samples=3, video_size=32, video_fps=4.0, progress=False)
    cfg = load_config("debug", ALL)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    embed(cfg, media, ref, progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "mmer_dist.embed", "--config", "debug", "--shards", str(media),
                             "--out", str(out), *ALL], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*.stats.json")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "index.json").exists(), "the embed finished before it was killed: the test proves nothing"
    n_done = len(list(out.glob("*.stats.json")))
    total = len(list(ref.glob("*.stats.json")))
    assert 1 <= n_done < total
    res = embed(cfg, media, out, progress=False)
    assert res.resumed == n_done and len(res.written) == total - n_done
    assert _files(out) == _files(ref)


@pytest.fixture(scope="module")
def saved_encoders(tmp_path_factory) -> dict[str, Path]:
    """Debug hf text/video encoders saved as local `pretrained` folders: loading them draws no random
    numbers, so a media model and a cached model start with identical fusion weights."""
    from transformers import AutoModel

    from mmer_dist.models import text, video

    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for m, make in (("text", text.debug_config), ("video", video.debug_config)):
        torch.manual_seed(7)
        AutoModel.from_config(make()).save_pretrained(root / m)
        out[m] = root / m
    return out


def test_training_on_embeddings_matches_training_frozen_encoders_on_media(synth_meld_shards: Path, tmp_path: Path,
                                                                         saved_encoders: dict[str, Path], capsys):
    enc = {m: str(p) for m, p in saved_encoders.items()}
    common = ["data.modalities=[text,video]", "model.fusion.dropout=0.0", "train.epochs=4", "optim.warmup_steps=2",
              "optim.lr=3e-3", "train.log_every=1", "model.text.pooling=mean"]
    cached = ["model.text.kind=cached", f"model.text.pretrained={enc['text']}",
              "model.video.kind=cached", f"model.video.pretrained={enc['video']}"]
    media = [f"model.text.pretrained={enc['text']}", "model.text.freeze=true",
             "model.video.kind=hf", f"model.video.pretrained={enc['video']}", "model.video.freeze=true"]
    emb = tmp_path / "emb"
    embed(load_config("debug", [*common, *cached]), synth_meld_shards, emb, progress=False)
    runs = {}
    for name, extra, shards in (("media", media, synth_meld_shards), ("cached", cached, emb)):
        run = tmp_path / name
        assert train_main(["--config", "debug", "--shards", str(shards), "--out", str(run), *common, *extra]) == 0
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        runs[name] = {"train": [r["loss"] for r in log if r["split"] == "train"],
                      "dev": [r for r in log if r["split"] == "dev"],
                      "metrics": json.loads((run / "metrics.json").read_text())}
    a, b = runs["media"], runs["cached"]
    assert len(a["train"]) == len(b["train"]) >= 8
    assert max(abs(x - y) for x, y in zip(a["train"], b["train"])) < 2e-2, (a["train"], b["train"])
    assert a["train"][0] != b["train"][-1]                           # it trained
    for x, y in zip(a["dev"], b["dev"]):
        assert abs(x["loss"] - y["loss"]) < 2e-2 and abs(x["macro_f1"] - y["macro_f1"]) < 0.05, (x, y)
    for k in ("macro_f1", "weighted_f1", "accuracy"):
        assert abs(a["metrics"][k] - b["metrics"][k]) < 0.05, (k, a["metrics"][k], b["metrics"][k])
    # the same shards, a config expecting another encoder (minilm, cls): refused before training, both named
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert train_main(["--config", "debug", "--shards", str(emb), "--out", str(bad), *common, *cached,
                       "model.text.pretrained=minilm", "model.text.pooling=cls"]) == 2
    err = capsys.readouterr().err
    assert "expects features from minilm" in err and enc["text"] in err and "pretrained, pooling" in err
    assert not bad.exists()
