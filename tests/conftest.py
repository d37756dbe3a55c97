"""Shared fixtures: a tiny synthetic MELD-layout corpus and its packed shards, made once per session.

Real data for tests/real lives in ../shared/data beside the checkout; `real_data` skips with a reason
when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep every test process (and its children) to one BLAS/OpenMP thread on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it lives in ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_meld_raw(tmp_path_factory) -> Path:
    """A tiny synthetic MELD-layout corpus (CSV + H.264/AAC clips)."""
    from mmer_dist.corpora.synthetic import write_corpus

    root = tmp_path_factory.mktemp("synth") / "meld_raw"
    write_corpus("meld", root, n=120, seed=0)
    return root


@pytest.fixture(scope="session")
def synth_meld_shards(synth_meld_raw, tmp_path_factory) -> Path:
    """`synth_meld_raw` packed with the train profile into small shards."""
    from mmer_dist.shards.pack import pack

    out = tmp_path_factory.mktemp("shards") / "meld"
    pack("meld", synth_meld_raw, out, profile="train", workers=1, shard_samples=20, video_size=32, video_fps=4.0)
    return out


@pytest.fixture(scope="session", autouse=True)
def _node_cache(tmp_path_factory):
    """The node cache of URL indexes (MMER_CACHE) in the session's tmp folder: no test writes ~/.cache."""
    os.environ["MMER_CACHE"] = str(tmp_path_factory.mktemp("mmer_cache"))


@pytest.fixture(scope="session")
def http_shards(synth_meld_shards):
    """`synth_meld_shards` served by a real http.server on loopback: its URL."""
    from servers import HttpServer

    with HttpServer(synth_meld_shards.parent) as server:
        yield f"{server.url}/{synth_meld_shards.name}"


@pytest.fixture(scope="session")
def s3_server(synth_meld_shards, tmp_path_factory):
    """moto's S3 server on loopback holding `synth_meld_shards` as s3://bucket/shards."""
    from servers import S3Server

    with S3Server(log=tmp_path_factory.mktemp("moto") / "server.log") as server:
        server.put(synth_meld_shards, "bucket/shards")
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server with this test's environment pointing s3fs at it (dummy credentials)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
