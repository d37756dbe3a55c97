"""Per-rank loaders over tiny shards: offsets, equal batches per rank, eval exactly-once, resume, streaming.

The shards are written with the packer's own tar writer and offset reader (mmer_dist.shards.writer),
following mmer_dist.shards.schema, from tiny generated FLAC audio + text (a few video samples).
Ranks are simulated in one process by passing rank/world_size explicitly.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmer_dist.config import DataConfig, SamplerConfig, replace
from mmer_dist.data.build import build_decoder, build_eval_loader, build_train_loader
from mmer_dist.data.map_loader import ShardDataset
from mmer_dist.data.stream_loader import StreamPlan
from mmer_dist.shards.schema import load_index, split_samples
from helpers import WordTokenizer, make_samples, write_shards


CFG = DataConfig(modalities=("text", "audio"), batch_size=4, eval_batch_size=5, num_workers=0,
                 max_audio_seconds=0.25, shuffle_buffer=8)
TOK = WordTokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    return write_shards(root, {"train": make_samples("train", 37, corrupt=(5,), no_audio=(8,)),
                               "dev": make_samples("dev", 23, seed=1)}, per_shard=5)


def keys_of(loader, start=None) -> list[list[str]]:
    it = loader.iter_from(start) if start is not None else iter(loader)
    return [b["keys"] for b in it]


def test_offsets_read_the_same_bytes_as_tarfile(shards):
    ds = ShardDataset(shards, "train", CFG, build_decoder(CFG, TOK, train=False))
    by_key: dict[str, dict[str, bytes]] = {}
    for name in ds.shard_names:
        with tarfile.open(shards / name) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                by_key.setdefault(key, {})[ext] = tf.extractfile(m).read()
    for i in range(len(ds)):                  # one read of the sample's byte range gives every member
        key, got = ds.members(i)
        assert got.pop("__key__") == key and got == by_key.pop(key)
    assert not by_key and len(ds) == 37
    sample = ds[0]
    assert sample["key"] == "train_0000" and sample["audio"].shape[0] <= 4000


def test_corrupt_member_is_skipped_and_counted_batches_fixed(shards):
    ds = ShardDataset(shards, "train", CFG, build_decoder(CFG, TOK, train=False))
    assert ds[5].reason == "audio_corrupt"
    assert ds[8]["audio"] is None                     # no audio member: modality absent, not a skip
    loader = build_train_loader(shards, CFG, SamplerConfig(), TOK, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 37 // 4
    assert sum(len(b["keys"]) for b in batches) == 36 - loader.counts()["skipped"].get("audio_corrupt", 0)
    drawn = [i for i in loader.sampler.local_indices()[:36]]
    assert loader.counts()["skipped"] == ({"audio_corrupt": 1} if 5 in drawn else {})
    small = [b for b in batches if len(b["keys"]) < 4]
    assert len(small) == (1 if 5 in drawn else 0)
    for b in batches:
        assert b["audio"].shape[0] == b["text_ids"].shape[0] == len(b["keys"]) == b["labels"].shape[0]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("weighting", ["none", "inverse"])
def test_train_loader_equal_batches_per_rank_and_union(shards, world, weighting):
    sampler_cfg = SamplerConfig(weighting=weighting)
    loaders = [build_train_loader(shards, CFG, sampler_cfg, TOK, rank=r, world_size=world, epoch=1)
               for r in range(world)]
    lens = {len(lo) for lo in loaders}
    per_rank = [[k for b in keys_of(lo) for k in b] for lo in loaders]
    nb = [len(keys_of(lo, 0)) for lo in loaders]
    assert len(lens) == 1 and set(nb) == lens
    assert lens.pop() == (-(-37 // world)) // 4
    if weighting == "none":
        # a distributed shuffle: ranks disjoint, one pass over the split (the tail past the last full
        # global batch is not drawn: drop_last on every rank)
        drawn = [lo.sampler.local_indices().tolist() for lo in loaders]
        union = set().union(*map(set, drawn))
        assert union <= set(range(37)) and sum(map(len, drawn)) == len(union) == world * 4 * len(loaders[0])
    assert all("train_0005" not in ks for ks in per_rank)          # the corrupt one never reaches a batch


def test_eval_loader_each_sample_once_equal_batches(shards):
    for world in (1, 2, 3, 4):
        loaders = [build_eval_loader(shards, CFG, TOK, split="dev", rank=r, world_size=world) for r in range(world)]
        assert len({len(lo) for lo in loaders}) == 1
        real, pads, nbatches = [], 0, set()
        for lo in loaders:
            batches = list(lo)
            nbatches.add(len(batches))
            for b in batches:
                real += [k for k, p in zip(b["keys"], b["pad"].tolist()) if not p]
                pads += int(b["pad"].sum())
        assert nbatches == {len(loaders[0])}
        assert sorted(real) == [f"dev_{i:04d}" for i in range(23)]
        assert pads == world * -(-23 // world) - 23


def test_mid_epoch_resume_equals_uninterrupted(shards):
    for bucket in (False, True):
        cfg = replace(CFG, bucket_by_length=bucket)
        full = build_train_loader(shards, cfg, SamplerConfig(weighting="sqrt_inverse"), TOK, rank=1, world_size=2)
        full.set_epoch(3)
        ref = list(full)
        ref_keys = [b["keys"] for b in ref]
        run = build_train_loader(shards, cfg, SamplerConfig(weighting="sqrt_inverse"), TOK, rank=1, world_size=2)
        run.set_epoch(3)
        it = iter(run)
        for _ in range(2):
            next(it)
        state = json.loads(json.dumps(run.state_dict()))          # a checkpoint round trip
        assert state["batches_done"] == 2
        fresh = build_train_loader(shards, cfg, SamplerConfig(weighting="sqrt_inverse"), TOK, rank=1, world_size=2)
        fresh.load_state_dict(state)
        fresh.set_epoch(3)
        rest = list(fresh)
        assert [b["keys"] for b in rest] == ref_keys[2:], bucket
        assert torch.equal(rest[0]["audio"], ref[2]["audio"])      # same crops too
        # the loop's way: explicit batch count
        assert keys_of(fresh, 2) == ref_keys[2:]
        assert keys_of(full) == ref_keys                          # a finished epoch again: starts over, never empty
        full.set_epoch(4)
        assert keys_of(full) != ref_keys and len(keys_of(full, 0)) == len(ref_keys)
        other = build_train_loader(shards, cfg, SamplerConfig(weighting="sqrt_inverse"), TOK, rank=0, world_size=3)
        if bucket:                                                # length buckets cannot be re-divided
            with pytest.raises(ValueError, match="length buckets"):
                other.load_state_dict(state)
        else:
            other.load_state_dict(state)                          # another world size: the rest re-divided
            assert other.batches_done == 0 and other.sampler.layout[0] == 2 * 4 * 2


def test_bucketing_reduces_padding_same_samples(shards):
    from helpers import padding_fraction

    plain = build_train_loader(shards, replace(CFG, max_audio_seconds=5.0), SamplerConfig(), TOK)
    bucketed = build_train_loader(shards, replace(CFG, max_audio_seconds=5.0, bucket_by_length=True), SamplerConfig(), TOK)
    kp = [b for b in keys_of(plain)]
    kb = [b for b in keys_of(bucketed)]
    assert len(kp) == len(kb) and sorted(sum(kp, [])) == sorted(sum(kb, []))
    dur = {ds_key: float(d) for ds_key, d in zip([plain.dataset.members(i)[0] for i in range(len(plain.dataset))],
                                                 plain.dataset.durations)}
    keys = sorted(dur)
    lengths = [dur[k] for k in keys]
    pos = {k: i for i, k in enumerate(keys)}
    assert padding_fraction([[pos[k] for k in b] for b in kb], lengths) < padding_fraction([[pos[k] for k in b] for b in kp], lengths)


def test_workers_give_the_same_batches_as_in_process(shards):
    a = build_train_loader(shards, CFG, SamplerConfig(weighting="inverse"), TOK, rank=0, world_size=2)
    b = build_train_loader(shards, replace(CFG, num_workers=2), SamplerConfig(weighting="inverse"), TOK, rank=0, world_size=2)
    ba, bb = list(a), list(b)
    assert [x["keys"] for x in ba] == [x["keys"] for x in bb]
    assert all(torch.equal(x["audio"], y["audio"]) for x, y in zip(ba, bb))
    assert a.counts() == b.counts()


def test_loop_with_accelerate_prepared_model_sees_our_batches(shards):
    """In-process: preparing model + optimizer leaves the per-rank loader alone (see smoke test for 2 ranks)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    loader = build_train_loader(shards, CFG, SamplerConfig(), TOK, rank=0, world_size=1)
    expect = keys_of(build_train_loader(shards, CFG, SamplerConfig(), TOK, rank=0, world_size=1))
    seen = []
    for batch in loader:
        loss = model(batch["audio"].mean(dim=1, keepdim=True)).logsumexp(-1).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        seen.append(batch["keys"])
    assert seen == expect


# --------------------------------------------------------------------------- streaming


def test_stream_equal_batches_per_rank_and_worker(shards, monkeypatch):
    for resample in (True, False):
        cfg = replace(CFG, loader="stream", stream_resample=resample, num_workers=2)
        world = 2
        loaders = [build_train_loader(shards, cfg, SamplerConfig(), TOK, rank=r, world_size=world) for r in range(world)]
        n = {len(lo) for lo in loaders}
        assert len(n) == 1
        for lo in loaders:
            per_worker = []
            for w in range(2):       # one worker's stream, in-process (webdataset reads WORKER/NUM_WORKERS)
                monkeypatch.setenv("WORKER", str(w))
                monkeypatch.setenv("NUM_WORKERS", "2")
                keys = [b["keys"] for b in lo.pipeline()]
                per_worker.append(len(keys))
                if not resample:     # each sample at most once per worker epoch
                    flat = sum(keys, [])
                    assert len(flat) == len(set(flat))
            monkeypatch.delenv("WORKER")
            monkeypatch.delenv("NUM_WORKERS")
            assert per_worker == [lo.plan.per_worker] * 2
            got = list(lo)           # real DataLoader workers
            assert len(got) == len(lo) == 2 * lo.plan.per_worker
            assert all(len(b["keys"]) + sum(b["skipped"].values()) == 4 for b in got)


def test_stream_weighted_and_counts(shards):
    cfg = replace(CFG, loader="stream", num_workers=0, steps_per_epoch=6)
    lo = build_train_loader(shards, cfg, SamplerConfig(weighting="inverse"), TOK, rank=0, world_size=1)
    batches = list(lo)
    assert len(batches) == len(lo) == 6
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert len(set(labels)) == 3                # minority classes show up


def test_stream_refuses_impossible_configs(shards):
    cfg = replace(CFG, loader="stream", stream_resample=False, num_workers=3)
    with pytest.raises(ValueError) as e:
        build_train_loader(shards, cfg, SamplerConfig(), TOK, rank=0, world_size=3)
    msg = str(e.value)
    assert "8 shards for 3 ranks x 3 workers = 9" in msg and "stream_resample=true" in msg
    with pytest.raises(ValueError, match="one global batch"):
        StreamPlan([2, 2], batch_size=4, world_size=2, num_workers=1, resample=True)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        StreamPlan([5] * 8, batch_size=4, world_size=2, num_workers=2, resample=False, steps_per_epoch=40)


def test_stream_resume_replays_the_rest(shards):
    cfg = replace(CFG, loader="stream", num_workers=0, steps_per_epoch=5)
    ref = build_train_loader(shards, cfg, SamplerConfig(weighting="inverse"), TOK, rank=1, world_size=2, epoch=2)
    ref_keys = keys_of(ref)
    run = build_train_loader(shards, cfg, SamplerConfig(weighting="inverse"), TOK, rank=1, world_size=2, epoch=2)
    it = iter(run)
    next(it), next(it)
    state = json.loads(json.dumps(run.state_dict()))
    fresh = build_train_loader(shards, cfg, SamplerConfig(weighting="inverse"), TOK, rank=1, world_size=2)
    fresh.load_state_dict(state)
    assert keys_of(fresh) == ref_keys[2:]
    other = build_train_loader(shards, cfg, SamplerConfig(), TOK, rank=0, world_size=3)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(state)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_eval_each_sample_once_at_its_position_equal_batches(shards, workers):
    cfg = replace(CFG, loader="stream", num_workers=workers)
    for world in (1, 2, 3, 9):                   # 9 ranks > 8 shards: a rank with no shard only pads
        loaders = [build_eval_loader(shards, cfg, TOK, split="train", rank=r, world_size=world) for r in range(world)]
        assert len({len(lo) for lo in loaders}) == 1
        covered, keys = [], {}
        for lo in loaders:
            batches = list(lo)
            assert len(batches) == len(lo)
            for b in batches:
                real = ~b["pad"]
                covered += b["index"][real].tolist() + b["skipped_index"]
                keys.update(zip(b["index"][real].tolist(), [k for k, r in zip(b["keys"], real) if r]))
        assert sorted(covered) == list(range(37)), (world, sorted(covered))     # the corrupt one as a skip
        assert all(k == f"train_{i:04d}" for i, k in keys.items())              # position = order in the split


def test_stream_train_batches_carry_split_positions(shards):
    cfg = replace(CFG, loader="stream", stream_resample=False, num_workers=0)
    lo = build_train_loader(shards, cfg, SamplerConfig(), TOK, rank=0, world_size=1)
    for b in lo:
        assert [f"train_{i:04d}" for i in b["index"].tolist()] == b["keys"]


def test_stream_damaged_or_short_shard_is_a_named_error(shards, tmp_path):
    import shutil

    from mmer_dist.data.loader import DataError

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    index = load_index(bad)
    names, rows = index.splits["train"].shards, split_samples(index, "train")
    data = (bad / names[1]).read_bytes()
    (bad / names[1]).write_bytes(data[: len(data) // 2])            # cut inside a member: a tar error
    second = int(rows["offset"][np.flatnonzero(rows["shard"] == 2)[1]])
    (bad / names[2]).write_bytes((bad / names[2]).read_bytes()[:second])   # cut between samples: reads "fine"
    for workers in (0, 2):                       # in a worker, the error reaches the main process as ours
        cfg = replace(CFG, loader="stream", stream_resample=False, num_workers=workers)
        for rank, name, what in ((1, names[1], "damaged shard"), (2, names[2], "holds 1 samples, the index says 5")):
            lo = build_eval_loader(bad, cfg, TOK, split="train", rank=rank, world_size=3)
            with pytest.raises(DataError) as e:
                list(lo)
            assert str(e.value).startswith(what if what == "damaged shard" else str(bad / name))
            assert str(bad / name) in str(e.value) and what in str(e.value) and "Traceback" not in str(e.value)
