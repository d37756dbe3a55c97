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
