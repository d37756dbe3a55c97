"""Where shards live (mmer_dist.shards.location) against real servers on loopback: reads, sizes and the index
through HTTP and `pipe:`, a missing object named at once, a stream that resumes after its server restarts,
credentials never shown, the node cache fetched once by concurrent ranks and never stale."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmer_dist.shards.location import (Location, RetryPolicy, ShardMissing, ShardReadError, local_output, redact,
                                       sync_command)
from mmer_dist.shards.schema import INDEX_FILE, load_index, split_samples
from servers import HttpServer

FAST = RetryPolicy(attempts=4, backoff_s=0.1, timeout_s=2.0)
REPO = Path(__file__).resolve().parents[2]


def test_http_reads_the_same_bytes_sizes_and_index_as_the_folder(http_shards, synth_meld_shards, tmp_path):
    web, local = Location(http_shards, tmp_path), Location(synth_meld_shards)
    tar = load_index(local).splits["train"].shards[1]
    assert web.read_bytes(tar) == (synth_meld_shards / tar).read_bytes()
    assert web.size(tar) == local.size(tar) == (synth_meld_shards / tar).stat().st_size
    a, b = load_index(web), load_index(local)
    assert a.to_json() == b.to_json() and a.sha256 == b.sha256
    for split in a.splits:
        x, y = split_samples(a, split), split_samples(b, split)
        assert all(np.array_equal(x[f], y[f]) for f in ("shard", "offset", "label", "speaker"))
    assert str(split_samples(a, "train").folder).startswith(str(tmp_path))       # the node cache, not the server


def test_pipe_location_reads_index_and_shards_through_the_command(synth_meld_shards, tmp_path):
    pipe = Location(f"pipe:cat {synth_meld_shards}/{{shard}}", tmp_path)
    index = load_index(pipe)
    assert index.to_json() == load_index(synth_meld_shards).to_json()
    tar = index.splits["dev"].shards[0]
    assert pipe.read_bytes(tar) == (synth_meld_shards / tar).read_bytes() and pipe.size(tar) is None
    local = split_samples(load_index(synth_meld_shards), "dev")
    assert np.array_equal(split_samples(index, "dev")["label"], local["label"])
    with pytest.raises(ValueError, match="needs {shard}"):
        Location("pipe:cat /some/file.tar")


def test_missing_object_is_named_at_once_without_retries(http_shards, capsys):
    loc = Location(http_shards, policy=FAST)
    t = time.time()
    with pytest.raises(ShardMissing) as e:
        loc.read_bytes("meld-train-999999.tar")
    assert f"{http_shards}/meld-train-999999.tar: not found" in str(e.value)
    assert time.time() - t < 2 and "retry" not in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a finished shards folder"):
        load_index(http_shards + "/nothing-here")


def test_a_pipe_command_that_fails_is_retried_then_named(tmp_path, capsys):
    src = tmp_path / "x.tar"
    src.write_bytes(os.urandom(5000))
    # fails twice (exit 1, message on stderr), then prints the file: a flaky transfer tool
    script = tmp_path / "flaky.sh"
    script.write_text(f'n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n+1)) > {tmp_path}/count\n'
                      f'if [ "$n" -lt 2 ]; then echo "network unreachable" >&2; exit 1; fi\ncat {tmp_path}/$1\n')
    flaky = Location(f"pipe:sh {script} {{shard}}", policy=FAST)
    assert flaky.read_bytes("x.tar") == src.read_bytes()
    err = capsys.readouterr().err
    assert err.count("retry") == 2 and "network unreachable" in err
    broken = Location("pipe:echo https://u:pw@host/x?sig=abc >&2; exit 3 # {shard}", policy=FAST)
    with pytest.raises(ShardReadError) as e:
        broken.read_bytes("x.tar")
    msg = str(e.value)
    assert "unreadable after 4 attempts" in msg and "status 3" in msg
    assert "pw@" not in msg and "sig=abc" not in msg and "https://***@host/x?***" in msg


def test_stream_resumes_at_its_byte_after_the_server_restarts(tmp_path, capsys):
    (tmp_path / "www").mkdir()
    data = os.urandom(48 << 20)             # larger than the socket buffers: the cut lands mid-transfer
    (tmp_path / "www" / "big.tar").write_bytes(data)
    server = HttpServer(tmp_path / "www").start()
    loc = Location(server.url, policy=RetryPolicy(attempts=8, backoff_s=0.25, timeout_s=2.0))
    f = loc.open_stream("big.tar")
    got = [f.read(1 << 20)]
    server.stop()                                  # the server goes away mid-stream
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: f.read(1 << 20), b"")))
    reader.start()
    time.sleep(1.5)
    server.start()                                 # and comes back on the same port (from this thread: the
    try:                                           # server dies with the thread that started it)
        reader.join(timeout=120)
    finally:
        server.stop()
    assert b"".join(got) == data
    assert "retry 1 of 7" in capsys.readouterr().err


def test_credentials_are_refused_in_urls_and_never_shown():
    for url in ("https://user:hunter2@host/shards", "s3://bucket/shards?X-Amz-Signature=hunter2"):
        with pytest.raises(ValueError) as e:
            Location(url)
        assert "hunter2" not in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)
    assert redact("curl https://me:pw@h/a?token=t1 && gsutil cp gs://b/x -") == \
        "curl https://***@h/a?*** && gsutil cp gs://b/x -"
    assert Location("https://me@host/s").shown("a.tar") == "https://***@host/s/a.tar"


def test_pack_and_embed_output_must_be_local_the_refusal_gives_the_upload(tmp_path):
    assert local_output(tmp_path / "out") == tmp_path / "out"
    assert local_output(f"file://{tmp_path}/out") == tmp_path / "out"
    with pytest.raises(ValueError) as e:
        local_output("s3://bucket/meld")
    assert sync_command("OUT", "s3://bucket/meld") in str(e.value)
    assert sync_command("OUT", "s3://b/m").endswith("&& aws s3 cp OUT/index.json s3://b/m/index.json")


_FETCH = """
import sys
from mmer_dist.shards.location import Location
from mmer_dist.shards.schema import load_index, split_samples
idx = load_index(Location(sys.argv[1], sys.argv[2]))
print(int(split_samples(idx, "train")["label"].sum()), split_samples(idx, "train").folder)
"""


def test_node_cache_is_fetched_once_by_concurrent_ranks(synth_meld_shards, tmp_path):
    shutil.copytree(synth_meld_shards, tmp_path / "www" / "meld")
    log, cache = tmp_path / "http.log", tmp_path / "cache"
    with HttpServer(tmp_path / "www", log=log) as server:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        ranks = [subprocess.Popen([sys.executable, "-c", _FETCH, f"{server.url}/meld", str(cache)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
        outs = {p.communicate(timeout=120)[0] for p in ranks}
    assert all(p.returncode == 0 for p in ranks) and len(outs) == 1, outs
    gets = [line for line in log.read_text().splitlines() if '"GET /meld/samples/train/label.npy' in line]
    assert len(gets) == 1, gets
    assert not list(cache.rglob("*.tmp"))


def test_a_changed_index_is_never_served_from_a_stale_cache(synth_meld_shards, tmp_path):
    served = tmp_path / "www" / "meld"
    shutil.copytree(synth_meld_shards, served)
    with HttpServer(tmp_path / "www") as server:
        loc = Location(f"{server.url}/meld", tmp_path / "cache")
        before = split_samples(load_index(loc), "train")
        labels = np.asarray(before["label"]).copy()
        # the folder is re-packed in place: other labels, another index.json
        np.save(served / "samples" / "train" / "label.npy", labels[::-1].copy())
        index = json.loads((served / INDEX_FILE).read_text())
        index["extra"]["repacked"] = True
        (served / INDEX_FILE).write_text(json.dumps(index))
        after = split_samples(load_index(loc), "train")
    assert after.folder != before.folder
    assert np.array_equal(after["label"], labels[::-1]) and np.array_equal(before["label"], labels)
