"""`mmer-dist eval` on 1 and 2 processes writes the identical metrics.json; `mmer-dist predict` on a raw
clip gives the label eval gave that clip; clear errors for a missing model or unreadable media."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmer_dist.cli import main as cli_main
from mmer_dist.shards.pack import pack
from mmer_dist.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw_run(synth_meld_raw, tmp_path_factory):
    """Raw-profile shards (original clip bytes, so predict and eval decode the very same file) and a
    small model trained on them."""
    root = tmp_path_factory.mktemp("evalpredict")
    shards = root / "shards"
    pack("meld", synth_meld_raw, shards, profile="raw", workers=1, shard_samples=25, progress=False)
    run = root / "run"
    assert train_main(["--config", "debug", "--shards", str(shards), "--out", str(run), "train.epochs=2",
                       "optim.lr=3e-3"]) == 0
    return shards, run


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("model", "shards")}


def test_eval_one_and_two_processes_identical(raw_run, tmp_path):
    shards, run = raw_run
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main(["eval", "--model", str(run), "--shards", str(shards), "--split", "test", "--out", str(one),
                     "--batch-size", "7"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(port), "-m", "mmer_dist.evaluate", "--model", str(run), "--shards", str(shards),
                    "--split", "test", "--out", str(two), "--batch-size", "7"],
                   check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert _strip(m1) == _strip(m2)
    # same rows in the same order; probabilities equal up to float summation order (other batch paddings)
    p1 = [json.loads(x) for x in (one / "predictions.jsonl").read_text().splitlines()]
    p2 = [json.loads(x) for x in (two / "predictions.jsonl").read_text().splitlines()]
    assert [(r["key"], r["label"], r["prediction"]) for r in p1] == [(r["key"], r["label"], r["prediction"]) for r in p2]
    for a, b in zip(p1, p2):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    n_test = sum(json.loads((shards / "index.json").read_text())["splits"]["test"]["class_counts"].values())
    assert m1["n"] == n_test
    for png in ("confusion.png", "per_class_f1.png", "curves.png"):
        assert (one / png).read_bytes()[:4] == b"\x89PNG"


def test_predict_matches_eval_on_a_raw_clip(raw_run, synth_meld_raw, tmp_path, capsys):
    shards, run = raw_run
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(run), "--shards", str(shards), "--split", "test", "--out", str(out)]) == 0
    rows = {r["key"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    with open(synth_meld_raw / "test_sent_emo.csv", encoding="utf-8", newline="") as f:
        checked = 0
        for row in list(csv.DictReader(f))[:3]:
            key = f"meld-test-dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}"
            clip = synth_meld_raw / "output_repeated_splits_test" / f"dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}.mp4"
            capsys.readouterr()
            assert cli_main(["predict", "--model", str(run), "--video", str(clip), "--text", row["Utterance"],
                             "--json"]) == 0
            result = json.loads(capsys.readouterr().out)
            assert result["label"] == rows[key]["prediction"], key
            assert result["probabilities"] == pytest.approx(rows[key]["probabilities"], abs=1e-4)
            checked += 1
    assert checked == 3


def test_predict_errors_are_clear(raw_run, tmp_path, capsys):
    _, run = raw_run
    assert cli_main(["predict", "--model", str(tmp_path / "nope"), "--text", "hi"]) == 2
    assert "not an exported model" in capsys.readouterr().err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    assert cli_main(["predict", "--model", str(run), "--video", str(bad)]) == 2
    assert "bad.mp4" in capsys.readouterr().err
    assert cli_main(["predict", "--model", str(run)]) == 2
    assert "at least one of" in capsys.readouterr().err


def test_ensemble_eval_and_predict_average_the_members(raw_run, tmp_path, capsys):
    """Two members (seeds 0 and 1): the ensemble's probabilities are the average of the members' per sample,
    its metrics those of the averaged predictions; predict averages the same way."""
    from mmer_dist.train.metrics import compute_metrics

    shards, run = raw_run
    second = tmp_path / "seed1"
    assert train_main(["--config", "debug", "--shards", str(shards), "--out", str(second), "train.epochs=2",
                       "optim.lr=3e-3", "train.seed=1"]) == 0
    out = tmp_path / "ens"
    assert cli_main(["eval", "--model", str(run), str(second), "--shards", str(shards), "--split", "test",
                     "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    members = [[json.loads(x) for x in (out / "members" / str(i) / "predictions.jsonl").read_text().splitlines()]
               for i in range(2)]
    assert any(a["probabilities"] != b["probabilities"] for a, b in zip(*members))      # really two models
    for r, a, b in zip(rows, *members):
        assert r["key"] == a["key"] == b["key"]
        for name, p in r["probabilities"].items():
            assert p == pytest.approx((a["probabilities"][name] + b["probabilities"][name]) / 2, abs=1e-12)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = compute_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], metrics["labels"])
    assert metrics["macro_f1"] == pytest.approx(expected["macro_f1"]) and len(metrics["ensemble"]) == 2
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(run), str(second), "--text", "I can't believe it!", "--json"]) == 0
    ens = json.loads(capsys.readouterr().out)
    singles = []
    for member in (run, second):
        assert cli_main(["predict", "--model", str(member), "--text", "I can't believe it!", "--json"]) == 0
        singles.append(json.loads(capsys.readouterr().out)["probabilities"])
    assert ens["probabilities"] == pytest.approx({k: (singles[0][k] + singles[1][k]) / 2 for k in singles[0]})
