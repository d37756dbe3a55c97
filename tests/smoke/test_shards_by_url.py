"""Shards by URL end to end, against real servers on loopback (tests/servers.py): 2-process training over
HTTP equals the same run on the local folder; s3:// (moto's server) trains, evaluates and inspects like the
folder; the S3 server stops answering mid-epoch and the run retries and loses or repeats no sample; a
missing object, a map-style loader or a packing output behind a URL are refused naming the URL and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import log_records, run_env, torchrun, train_overrides
from mmer_dist.evaluate import main as eval_main
from mmer_dist.shards.inspect import main as inspect_main
from mmer_dist.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[2]
S3 = "s3://bucket/shards"


def _stream(*extra: str) -> list[str]:
    return ["--config", "debug", *train_overrides("data.loader=stream", *extra)]


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_http_two_processes_give_the_metrics_of_the_local_folder(http_shards, synth_meld_shards, tmp_path):
    args = _stream("train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=6")
    runs = {"local": (tmp_path / "local", str(synth_meld_shards)), "http": (tmp_path / "http", http_shards)}
    for run, shards in runs.values():
        subprocess.run(torchrun(2, [*args, "--shards", shards, "--out", str(run)]), check=True, env=run_env(),
                       cwd=REPO, timeout=900, stdout=subprocess.DEVNULL)
    (local, _), (http, _) = runs["local"], runs["http"]
    a, b = _metrics(local / "metrics.json"), _metrics(http / "metrics.json")
    assert b["shards"] == http_shards
    for key in ("macro_f1", "weighted_f1", "accuracy", "loss", "confusion_matrix", "n", "train_data"):
        assert a[key] == b[key], key
    drop = ("samples_per_s", "time")
    same = [[{k: v for k, v in r.items() if k not in drop} for r in log_records(run, None)] for run in (local, http)]
    assert same[0] == same[1] and len(log_records(http, "dev")) == 2


@pytest.mark.slow
def test_s3_trains_evaluates_and_inspects_like_the_folder(s3, synth_meld_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main([*_stream("train.max_steps=4", "train.eval_every=4"), "--shards", S3, "--out", str(run)]) == 0
    assert _metrics(run / "metrics.json")["shards"] == S3 and _metrics(run / "metrics.json")["n"] == 23
    for where, shards in (("local", str(synth_meld_shards)), ("s3", S3)):
        out = str(tmp_path / where)
        assert eval_main(["--model", str(run), "--shards", shards, "--split", "test", "--out", out]) == 0
    a, b = _metrics(tmp_path / "local" / "metrics.json"), _metrics(tmp_path / "s3" / "metrics.json")
    assert {k: v for k, v in a.items() if k != "shards"} == {k: v for k, v in b.items() if k != "shards"}
    assert (tmp_path / "local" / "predictions.jsonl").read_text() == (tmp_path / "s3" / "predictions.jsonl").read_text()
    capsys.readouterr()
    summaries = []
    for shards in (str(synth_meld_shards), S3):
        assert inspect_main([shards, "--json"]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    assert summaries[1].pop("path") == S3 and summaries[0].pop("path") == str(synth_meld_shards)
    assert summaries[0] == summaries[1] and summaries[1]["damaged"] == []


@pytest.mark.slow
def test_s3_server_stops_answering_mid_epoch_nothing_lost_or_repeated(s3, synth_meld_shards, tmp_path):
    # each shard read once per epoch (no resampling), small shuffle buffer: reads go on all through the epoch
    args = _stream("data.stream_resample=false", "data.shuffle_buffer=4", "train.epochs=4",
                   "data.read_timeout_s=1", "data.read_retries=10")
    ref, run = tmp_path / "ref", tmp_path / "s3"
    assert train_main([*args, "--shards", str(synth_meld_shards), "--out", str(ref)]) == 0
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mmer_dist.train", *args, "--shards", S3, "--out", str(run)],
                                env=run_env(**s3.env), cwd=REPO, stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.time() + 300
    while not ((run / "log.jsonl").exists() and len(log_records(run)) >= 3) and time.time() < deadline:
        assert proc.poll() is None, err.read_text()[-2000:]
        time.sleep(0.1)
    s3.pause()                     # mid-epoch: the server accepts connections and answers nothing
    time.sleep(4)
    s3.resume()
    assert proc.wait(timeout=600) == 0, err.read_text()[-2000:]
    log = err.read_text()
    assert "mmer_dist: s3://bucket/shards/meld-" in log and "; retry 1 of 9" in log      # the outage was felt
    counts = [[(r.get("step"), r.get("samples_read"), r.get("epoch_end"), r.get("samples"), r.get("digest"))
               for r in log_records(x, None) if "samples_read" in r or "epoch_end" in r] for x in (ref, run)]
    assert counts[0] == counts[1] and sum(1 for c in counts[1] if c[2] is not None) == 4
    a, b = _metrics(ref / "metrics.json"), _metrics(run / "metrics.json")
    assert a["macro_f1"] == b["macro_f1"] and a["train_data"] == b["train_data"]


def test_s3_missing_object_map_loader_and_packing_output_are_named(s3, synth_meld_shards, tmp_path, capsys):
    from mmer_dist.config import DataConfig, SamplerConfig
    from mmer_dist.data.build import build_train_loader
    from mmer_dist.data.loader import DataError
    from mmer_dist.shards.pack import main as pack_main

    broken = tmp_path / "broken"
    shutil.copytree(synth_meld_shards, broken)
    gone = "meld-train-000002.tar"
    (broken / gone).unlink()
    s3.put(broken, "bucket/broken")
    url = f"s3://bucket/broken/{gone}"
    base = [*_stream("train.max_steps=2"), "--out", str(tmp_path / "r")]
    assert train_main([*base, "--shards", "s3://bucket/broken"]) == 2         # preflight: one HEAD per shard
    assert f"{url}: missing" in capsys.readouterr().err
    cfg = DataConfig(shards="s3://bucket/broken", modalities=("audio",), loader="stream", stream_resample=False,
                     batch_size=4, read_retries=2)
    with pytest.raises(DataError, match=f"{url}: not found"):               # the stream: at once, not retried
        list(build_train_loader(cfg.shards, cfg, SamplerConfig(), None))
    assert train_main([*base, "--shards", S3, "data.loader=map"]) == 2
    assert "set data.loader=stream" in capsys.readouterr().err.lower()
    assert pack_main(["meld", "--root", str(tmp_path), "--out", "s3://bucket/new"]) != 0
    assert "aws s3 sync OUT s3://bucket/new --exclude 'index.json'" in capsys.readouterr().err
