"""Every sample accounted for: file limits, damaged shards, skip budgets, elastic resume of the map loader.

Shards come from the tests' helpers (the packer's writer and merge) or the session's packed synthetic MELD
folder (copied before damaging it); ranks are simulated in one process by passing rank/world_size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import WordTokenizer, make_samples, write_shards
from mmer_dist.config import DataConfig, SamplerConfig
from mmer_dist.data.build import build_eval_loader, build_train_loader
from mmer_dist.data.loader import DataError
from mmer_dist.data.seeds import multiset_digest
from mmer_dist.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[2]
CFG = DataConfig(modalities=("text", "audio"), batch_size=4, eval_batch_size=5, max_audio_seconds=0.25)
TOK = WordTokenizer()
TRAIN = ["--config", "debug", "data.modalities=[text,audio]", "train.max_steps=3", "train.log_every=1",
         "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("tiny"), {"train": make_samples("train", 37),
                                                          "dev": make_samples("dev", 23, seed=1)}, per_shard=5)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_more_shards_than_the_file_limit_reads_every_sample(tmp_path):
    """200 one-sample shards under RLIMIT_NOFILE = 64 (hard, so it cannot be raised): every sample is read."""
    root = write_shards(tmp_path / "many", {"train": make_samples("train", 200)}, per_shard=1)
    script = f"""
import resource, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from helpers import WordTokenizer
from mmer_dist.config import DataConfig
from mmer_dist.data.build import build_decoder
from mmer_dist.data.shard_reader import ShardDataset
cfg = DataConfig(modalities=("text", "audio"), max_audio_seconds=0.25)
ds = ShardDataset({str(root)!r}, "train", cfg, build_decoder(cfg, WordTokenizer(), train=False))
keys = set()
for i in list(range(200)) * 2:                   # twice, so the cache closes and reopens files
    sample = ds[i]
    assert isinstance(sample, dict), sample
    keys.add(sample["key"])
print(len(keys), len(ds.files._fds))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    n_keys, open_now = map(int, out.stdout.split())
    assert n_keys == 200 and open_now <= 16         # a quarter of the limit at most


@pytest.mark.parametrize("split", ["train", "dev"])
def test_truncated_shard_fails_preflight_naming_it(synth_meld_shards, tmp_path, capsys, split):
    root = _copy(synth_meld_shards, tmp_path / "s")
    victim = sorted(root.glob(f"meld-{split}-*.tar"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 10_000)
    assert train_main([*TRAIN, "--shards", str(root), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "the index says" in err and "mmer-dist verify" in err
    assert not (tmp_path / "run").exists()          # nothing started


def test_shard_damaged_after_the_checks_is_a_named_error_not_a_skip(tiny, tmp_path):
    root = _copy(tiny, tmp_path / "s")
    train = build_train_loader(root, CFG, SamplerConfig(), TOK, rank=0, world_size=1)
    dev = build_eval_loader(root, CFG, TOK, split="dev")
    for name in ("tiny-train-000003.tar", "tiny-dev-000000.tar"):
        with open(root / name, "r+b") as f:
            f.truncate(1024)
    with pytest.raises(DataError, match=r"tiny-train-000003\.tar.*short read.*mmer-dist verify"):
        list(train)
    with pytest.raises(DataError, match=r"tiny-dev-000000\.tar"):
        list(dev)


def test_decode_failures_counted_over_the_run_and_fatal_past_the_budget(tmp_path, capsys):
    root = write_shards(tmp_path / "s", {"train": make_samples("train", 37, corrupt=(5, 6)),
                                        "dev": make_samples("dev", 10, seed=1)}, per_shard=5)
    run = tmp_path / "run"
    common = [*TRAIN, "--shards", str(root), "train.max_steps=18", "train.checkpoint_every=9", "data.batch_size=4"]
    assert train_main([*common, "--out", str(run), "data.max_skip_fraction=0.2"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    drawn = metrics["train_data"]["read"]
    assert drawn == 18 * 4                                   # every drawn sample read, once
    # with weighting none every epoch is a permutation of the 36 drawn positions: both corrupt samples
    # once per full epoch (2 epochs of 9 steps)
    assert metrics["train_data"]["skipped"] == {"audio_corrupt": 4}
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log if "skipped" in r][-1] == 4
    state = json.loads(next((run / "checkpoints").glob("step-000009/trainer_state.json")).read_text())
    assert state["skipped"] == {"audio_corrupt": 2} and state["samples_read"] == 36
    assert train_main([*common, "--out", str(tmp_path / "strict"), "data.max_skip_fraction=0.0"]) == 1
    err = capsys.readouterr().err
    assert "failed to decode, more than data.max_skip_fraction=0" in err and "audio_corrupt" in err
    assert "tiny-train-" in err                               # the last skip names its shard


def _drawn(loader, batches=None) -> Counter:
    """Dataset indices of the batches a loader hands out (all, or the first `batches`)."""
    out: Counter = Counter()
    for k, batch in enumerate(loader.iter_from()):
        out.update(batch["index"].tolist())
        out.update(batch["skipped_index"])
        if batches is not None and k + 1 == batches:
            break
    return out


@pytest.mark.parametrize("new_world", [1, 3])
def test_elastic_resume_draws_exactly_the_uninterrupted_epoch(tiny, new_world):
    """2 ranks stop after 3 batches; the rest of the epoch re-divided over 1 or 3 ranks: the multiset of
    samples over the epoch is the 2-rank run's, every rank runs the same number of steps."""
    cfg = DataConfig(modalities=("text", "audio"), batch_size=3, max_audio_seconds=5.0)
    sampler = SamplerConfig(weighting="sqrt_inverse")       # with replacement: repeats must be kept, not merged
    full = Counter()
    for r in range(2):
        full += _drawn(build_train_loader(tiny, cfg, sampler, TOK, rank=r, world_size=2, epoch=1))
    first = [build_train_loader(tiny, cfg, sampler, TOK, rank=r, world_size=2, epoch=1) for r in range(2)]
    seen = sum((_drawn(lo, 3) for lo in first), Counter())
    state = json.loads(json.dumps(first[0].state_dict()))
    rest = [build_train_loader(tiny, cfg, sampler, TOK, rank=r, world_size=new_world, epoch=1)
            for r in range(new_world)]
    for lo in rest:
        lo.load_state_dict(state)
    assert len({len(lo) for lo in rest}) == 1               # equal steps on the new ranks
    for lo in rest:
        seen += _drawn(lo)
    assert seen == full and sum(full.values()) == 2 * 3 * (37 // 2 // 3)
    assert multiset_digest(list(seen.elements())) == multiset_digest(list(full.elements()))


def test_elastic_resume_of_a_bucketed_epoch_is_refused_with_the_choice(tiny):
    cfg = DataConfig(modalities=("text", "audio"), batch_size=3, max_audio_seconds=5.0, bucket_by_length=True)
    two = build_train_loader(tiny, cfg, SamplerConfig(), TOK, rank=0, world_size=2)
    _drawn(two, 2)
    three = build_train_loader(tiny, cfg, SamplerConfig(), TOK, rank=0, world_size=3)
    with pytest.raises(ValueError, match="length buckets.*Resume with 2 processes"):
        three.load_state_dict(two.state_dict())


def test_elastic_resume_of_a_stream_is_refused_with_the_choices(tiny, tmp_path):
    from mmer_dist.config import Config, replace
    from mmer_dist.train.loop import check_elastic_resume

    cfg = replace(Config(), data=replace(Config().data, loader="stream"))
    with pytest.raises(ValueError, match="Resume with 2 processes.*data.loader=map"):
        check_elastic_resume(tmp_path, 2, 3, None, cfg)
    with pytest.raises(ValueError, match="universal"):
        check_elastic_resume(tmp_path, 2, 3, 2, Config())


def test_old_index_names_the_upgrade_and_reindex_upgrades_it(synth_meld_shards, tmp_path, capsys):
    """A folder of index format 1 (every sample's key and label in index.json, no speakers in the stats):
    every reader names `mmer-dist reindex`; reindex rebuilds the same compact index as a fresh pack."""
    from mmer_dist.cli import main as cli_main
    from mmer_dist.shards.schema import Samples, load_index

    root = _copy(synth_meld_shards, tmp_path / "old")
    index = json.loads((root / "index.json").read_text())
    index["schema_version"] = 1                              # what an older version wrote
    for split in index["splits"].values():
        split["keys"], split["labels"] = ["?"] * split.get("sizes", [0])[0], [0]
        for k in ("shard_bytes", "shard_classes"):
            split.pop(k)
    (root / "index.json").write_text(json.dumps(index))
    shutil.rmtree(root / "samples")
    for stats in root.glob("*.stats.json"):
        data = json.loads(stats.read_text())
        for s in data["samples"]:
            s.pop("speaker"), s.pop("group")
        stats.write_text(json.dumps(data))
    assert cli_main(["inspect", str(root)]) == 2
    assert f"mmer-dist reindex {root}" in capsys.readouterr().err
    assert train_main([*TRAIN, "--shards", str(root), "--out", str(tmp_path / "run")]) == 2
    assert "mmer-dist reindex" in capsys.readouterr().err
    assert cli_main(["reindex", str(root)]) == 0
    new, ref = load_index(root), load_index(synth_meld_shards)
    assert new.to_json() == ref.to_json()
    for split, si in ref.splits.items():
        for col in ("shard", "offset", "size", "label", "speaker", "group", "duration"):
            assert (Samples(root, split, si.num_samples)[col] == Samples(synth_meld_shards, split, si.num_samples)[col]).all()
