"""Unit and property tests of mmer_dist.data.sampler, mmer_dist.weighting and mmer_dist.data.balance's ClassBalancedStream
(single process; the multi-process run is tests/smoke/test_sampler_dist.py).
    .venv/bin/pytest tests/unit/test_sampler.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from helpers import DistributedEvalSampler, expected_class_distribution
from mmer_dist.data.balance import ClassBalancedStream
from mmer_dist.data.sampler import DistributedWeightedSampler, eval_indices
from mmer_dist.weighting import class_counts, class_target_distribution, class_weights, sample_weights

MELD_MIX = [0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03]     # MELD-like imbalance, 7 classes
NAMES = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _labels(n: int, seed: int = 0, mix: list[float] = MELD_MIX) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(mix), size=n, p=mix)


def _samplers(w, R, **kw) -> list[DistributedWeightedSampler]:
    return [DistributedWeightedSampler(w, num_replicas=R, rank=r, **kw) for r in range(R)]


def _within_5_sigma(freq: np.ndarray, target: np.ndarray, n: int) -> None:
    """Multinomial frequencies of n draws: each within 5 standard errors of its target."""
    tol = 5 * np.sqrt(target * (1 - target) / n) + 1e-12
    assert np.all(np.abs(freq - target) <= tol), (freq, target, tol)


# ---------------------------------------------------------------- weight helpers

def test_class_weights_schemes_by_hand():
    counts = [100, 10, 0, 1]
    inv = class_weights(counts, "inverse")
    assert inv[2] == 0.0
    assert inv.sum() == pytest.approx(3.0)               # normalised to the number of classes present
    assert inv[0] / inv[1] == pytest.approx(0.1) and inv[1] / inv[3] == pytest.approx(0.1)
    sq = class_weights(counts, "sqrt_inverse")
    assert sq[0] / sq[1] == pytest.approx(1 / math.sqrt(10)) and sq[2] == 0.0
    beta = 0.99
    en = class_weights(counts, "effective_number", beta=beta)
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in (100, 10, 1)])
    assert en[[0, 1, 3]] == pytest.approx(raw / raw.sum() * 3)
    assert en[2] == 0.0
    assert class_weights(counts, "none").tolist() == [1.0] * 4


def test_class_weights_by_name_and_manual():
    counts = {"neutral": 40, "fear": 2}
    w = class_weights(counts, "inverse", label_names=NAMES)
    assert w[NAMES.index("joy")] == 0.0 and w[NAMES.index("fear")] / w[0] == pytest.approx(20)
    m = class_weights(counts, "manual", manual={"fear": 5.0, "joy": 0.0}, label_names=NAMES)
    assert m.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 5.0]     # missing names default to 1.0
    with pytest.raises(ValueError, match="unknown labels.*'feer'.*valid: neutral, joy"):
        class_weights(counts, "manual", manual={"feer": 5.0}, label_names=NAMES)
    with pytest.raises(ValueError, match="label_names"):
        class_weights(counts, "inverse")
    with pytest.raises(ValueError, match="unknown labels"):
        class_weights({"nope": 3}, "inverse", label_names=NAMES)
    with pytest.raises(ValueError, match="unknown weighting scheme"):
        class_weights([1, 2], "inverted")
    with pytest.raises(ValueError, match="beta"):
        class_weights([1, 2], "effective_number", beta=1.0)
    with pytest.raises(ValueError, match="every class count is zero"):
        class_weights([0, 0], "inverse")
    with pytest.raises(ValueError, match=">= 0"):
        class_weights([3, -1], "inverse")
    with pytest.raises(ValueError, match=r"manual class weight for 'fear'"):
        class_weights(counts, "manual", manual={"fear": float("nan")}, label_names=NAMES)


def test_sample_weights_and_label_errors():
    y = np.array([0, 2, 2, 1])
    assert sample_weights(y, [1.0, 2.0, 3.0]).tolist() == [1.0, 3.0, 3.0, 2.0]
    with pytest.raises(ValueError, match=r"labels\[2\] = 7"):
        sample_weights([0, 1, 7], [1.0, 1.0])
    with pytest.raises(ValueError, match="integer"):
        class_counts([0.5, 1.0], 2)
    assert class_counts(torch.tensor([1, 1, 3]), 5).tolist() == [0, 2, 0, 1, 0]


@PROPS
@given(counts=st.lists(st.integers(0, 10_000), min_size=1, max_size=12).filter(lambda c: sum(c) > 0),
       scheme=st.sampled_from(["inverse", "sqrt_inverse", "effective_number"]),
       beta=st.floats(0.5, 0.99999))
def test_property_class_weights(counts, scheme, beta):
    c = np.array(counts, dtype=float)
    w = class_weights(counts, scheme, beta=beta)
    present = c > 0
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert np.all(w[~present] == 0) and np.all(w[present] > 0)
    assert w.sum() == pytest.approx(present.sum())
    # rarer classes never get less weight
    order = np.argsort(c[present], kind="stable")
    assert np.all(np.diff(w[present][order]) <= 1e-9 * w.max())
    # the class distribution the weights reach
    target = class_target_distribution(counts, w)
    if scheme == "inverse":
        assert target[present] == pytest.approx(np.full(present.sum(), 1 / present.sum()))
    elif scheme == "sqrt_inverse":
        assert target == pytest.approx(np.sqrt(c) / np.sqrt(c).sum())


@PROPS
@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=300),
       scheme=st.sampled_from(["none", "inverse", "sqrt_inverse", "effective_number"]))
def test_property_expected_distribution_matches_class_level(labels, scheme):
    y = np.array(labels)
    counts = class_counts(y, 6)
    cw = class_weights(counts, scheme)
    p = expected_class_distribution(y, sample_weights(y, cw), 6)
    assert p == pytest.approx(class_target_distribution(counts, cw))
    assert p.sum() == pytest.approx(1.0) and np.all(p[counts == 0] == 0)


# ---------------------------------------------------------------- sampler: validation

@pytest.mark.parametrize("bad, msg", [
    ([], "empty"), ([0.0, 0.0], "all 2 weights are zero"), ([1.0, -1.0], r"weights\[1\] = -1.0"),
    ([1.0, float("nan")], r"weights\[1\] = nan.*finite"), ([1.0, float("inf")], "finite"),
    ([[1.0, 2.0]], "1-D"), (["a", "b"], "numbers"),
])
def test_bad_weights_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        DistributedWeightedSampler(bad, num_replicas=1, rank=0)


def test_bad_world_and_sizes():
    with pytest.raises(ValueError, match="rank=2"):
        DistributedWeightedSampler([1.0], num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_samples=0"):
        DistributedWeightedSampler([1.0], num_replicas=1, rank=0, num_samples=0)


def test_world_defaults_come_from_mmer_dist(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    s = DistributedWeightedSampler(np.ones(10))
    assert (s.num_replicas, s.rank, s.num_samples) == (4, 2, 3)
    idx, pad = eval_indices(10)
    assert idx.tolist() == [2, 6, 0] and pad.tolist() == [False, False, True]


# ---------------------------------------------------------------- sampler: the draw

@pytest.mark.parametrize("replacement", [True, False])
def test_determinism_and_epochs(replacement):
    w = sample_weights(_labels(5000), class_weights(class_counts(_labels(5000), 7), "inverse"))
    a = DistributedWeightedSampler(w, num_replicas=2, rank=1, seed=3, replacement=replacement)
    b = DistributedWeightedSampler(w, num_replicas=2, rank=1, seed=3, replacement=replacement)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    c = DistributedWeightedSampler(w, num_replicas=2, rank=1, seed=4, replacement=replacement)
    assert list(c) != first


def test_zero_weight_items_are_never_drawn():
    w = np.zeros(1000)
    w[[3, 500, 999]] = [1.0, 2.0, 1.0]
    s = DistributedWeightedSampler(w, num_replicas=1, rank=0, num_samples=4000, seed=0)
    got = np.array(list(s))
    assert set(got.tolist()) == {3, 500, 999}
    _within_5_sigma(np.bincount(got, minlength=1000)[[3, 500, 999]] / got.size, np.array([.25, .5, .25]), got.size)
    s2 = DistributedWeightedSampler(w, num_replicas=2, rank=0, replacement=False)
    assert s2.num_samples == 2 and s2.num_padding == 1                 # 3 drawable items over 2 ranks


@pytest.mark.parametrize("R", [1, 2, 3, 8])
def test_union_follows_target_distribution(R):
    """Class frequencies of the union over ranks within 5 standard errors of the target."""
    y = _labels(20_000, seed=1)
    for scheme in ("inverse", "sqrt_inverse", "effective_number"):
        cw = class_weights(class_counts(y, 7), scheme, beta=0.999)
        w = sample_weights(y, cw)
        target = expected_class_distribution(y, w, 7)
        union = np.concatenate([s.local_indices() for s in _samplers(w, R, seed=11, num_samples=60_000 // R)])
        freq = np.bincount(y[union], minlength=7) / union.size
        _within_5_sigma(freq, target, union.size)


def test_without_replacement_covers_each_item_once_in_weighted_order():
    y = _labels(30_001, seed=2)
    w = sample_weights(y, class_weights(class_counts(y, 7), "inverse"))
    ss = _samplers(w, 4, replacement=False, seed=5)
    g = ss[0].global_indices()
    assert np.array_equal(np.sort(g[:30_001]), np.arange(30_001))
    assert ss[0].num_padding == g.size - 30_001 == 3
    assert np.array_equal(g[30_001:], g[:3])                          # padding wraps to the start
    # weights shape the order: the first tenth is class-balanced, not 47% neutral
    head = np.bincount(y[g[:3000]], minlength=7) / 3000
    assert head.max() < 0.25 and head[0] < 0.2


# ---------------------------------------------------------------- property: partition arithmetic

@PROPS
@given(n=st.integers(1, 400), zeros=st.integers(0, 50), R=st.integers(1, 9),
       ns=st.one_of(st.none(), st.integers(1, 120)), replacement=st.booleans(),
       seed=st.integers(0, 2**40), epoch=st.integers(0, 5), data=st.data())
def test_property_partition(n, zeros, R, ns, replacement, seed, epoch, data):
    rng = np.random.default_rng(seed % 1000)
    w = rng.random(n) + 0.01
    w[rng.choice(n, size=min(zeros, n - 1), replace=False)] = 0.0
    ss = _samplers(w, R, num_samples=ns, seed=seed, replacement=replacement)
    for s in ss:
        s.set_epoch(epoch)
    m = int((w > 0).sum())
    base = n if replacement else m
    expect_ns = ns if ns is not None else math.ceil(base / R)
    g = ss[0].global_indices()
    locals_ = [s.local_indices() for s in ss]
    # equal lengths, and the union (positions r::R) is exactly the global draw
    assert all(len(s) == expect_ns == loc.size for s, loc in zip(ss, locals_))
    rebuilt = np.empty(expect_ns * R, dtype=np.int64)
    for r, loc in enumerate(locals_):
        rebuilt[r::R] = loc
    assert np.array_equal(rebuilt, g)
    assert np.all(w[g] > 0)
    if not replacement:
        total = expect_ns * R
        assert ss[0].num_padding == max(0, total - m)
        assert sum(s.rank_padding for s in ss) == ss[0].num_padding
        assert all(int(s.is_padding().sum()) == s.rank_padding for s in ss)
        first = g[:min(total, m)]
        assert np.unique(first).size == first.size                      # no repeats before the wrap
        if total >= m:
            assert set(first.tolist()) == set(np.flatnonzero(w).tolist())
        # padding rows repeat the order from its start
        assert np.array_equal(g[m:], g[np.arange(m, total) % m]) if total > m else True
    # resume anywhere = the rest of the epoch, on a fresh sampler
    r = data.draw(st.integers(0, R - 1))
    k = data.draw(st.integers(0, expect_ns))
    ss[r].seek(0)
    ss[r].advance(k)
    state = json.loads(json.dumps(ss[r].state_dict()))
    fresh = DistributedWeightedSampler(w, num_replicas=R, rank=r, num_samples=ns, seed=seed, replacement=replacement)
    fresh.load_state_dict(state)
    fresh.set_epoch(epoch)                                   # the loop's usual call keeps the position
    assert len(fresh) == expect_ns - k
    assert list(fresh) == locals_[r][k:].tolist()


@PROPS
@given(n=st.integers(0, 500), R=st.integers(1, 12))
def test_property_eval_indices(n, R):
    parts = [eval_indices(n, R, r) for r in range(R)]
    per = math.ceil(n / R)
    assert all(idx.numel() == per == pad.numel() for idx, pad in parts)
    real = torch.cat([idx[~pad] for idx, pad in parts]).tolist()
    assert sorted(real) == list(range(n))                     # every sample exactly once
    assert sum(int(pad.sum()) for _, pad in parts) == R * per - n
    if n:
        assert all(int(idx.max()) < n for idx, _ in parts if idx.numel())
    es = DistributedEvalSampler(n, R, R - 1)
    assert list(es) == parts[-1][0].tolist() and es.num_padding == int(parts[-1][1].sum())


# ---------------------------------------------------------------- resume protocol

class _Identity(Dataset):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_counts_consumed_not_prefetched(workers):
    """DataLoader workers prefetch ahead; the state reflects what the loop trained on."""
    w = np.random.default_rng(0).random(1000) + 0.1
    s = DistributedWeightedSampler(w, num_replicas=2, rank=0, seed=9)
    full = s.local_indices().tolist()
    loader = DataLoader(_Identity(), batch_size=16, sampler=s, num_workers=workers, prefetch_factor=4 if workers else None)
    consumed: list[int] = []
    for i, batch in enumerate(loader):
        consumed += batch.tolist()
        s.advance(16)
        if i == 6:
            state = s.state_dict()
            break
    assert state["position"] == 7 * 16
    fresh = DistributedWeightedSampler(w, num_replicas=2, rank=0, seed=9)
    fresh.load_state_dict(state)
    rest = [x for b in DataLoader(_Identity(), batch_size=16, sampler=fresh) for x in b.tolist()]
    assert consumed + rest == full
    assert len(DataLoader(_Identity(), batch_size=16, sampler=fresh)) == math.ceil((500 - 112) / 16)


def test_advance_clamps_and_epoch_change_resets():
    s = DistributedWeightedSampler(np.ones(10), num_replicas=1, rank=0)
    assert s.advance(8) == 8 and s.advance(8) == 10
    assert list(s) == [] and len(s) == 0                    # epoch fully consumed: nothing left
    s.set_epoch(0)
    assert s.position == 10
    s.set_epoch(1)
    assert s.position == 0 and len(list(s)) == 10
    with pytest.raises(ValueError, match="n=-1"):
        s.advance(-1)
    with pytest.raises(ValueError, match="seek"):
        s.seek(11)


def test_load_state_refuses_a_different_draw():
    w = np.arange(1, 101, dtype=float)
    s = DistributedWeightedSampler(w, num_replicas=2, rank=0, seed=1)
    s.advance(5)
    st_ = s.state_dict()
    DistributedWeightedSampler(w, num_replicas=2, rank=1, seed=1).load_state_dict(st_)   # rank-independent
    elastic = DistributedWeightedSampler(w, num_replicas=4, rank=0, seed=1)   # another world size: the rest
    elastic.load_state_dict(st_)                                              # of the epoch, re-divided
    assert elastic.layout == (10, 100) and elastic.position == 0
    cases = [
        (dict(weights=w, num_replicas=2, rank=0, seed=1, num_samples=10), "num_samples"),
        (dict(weights=w, num_replicas=2, rank=0, seed=2), "seed"),
        (dict(weights=w, num_replicas=2, rank=0, seed=1, replacement=False), "replacement"),
        (dict(weights=w[::-1].copy(), num_replicas=2, rank=0, seed=1), "weights changed"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            DistributedWeightedSampler(**kw).load_state_dict(st_)
    with pytest.raises(ValueError, match="not a DistributedWeightedSampler state"):
        s.load_state_dict({"epoch": 0, "position": 3})


# ---------------------------------------------------------------- streaming balance (mmer_dist.data.balance)

def _endless(mix: list[float], seed: int):
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        yield (f"s{i}", int(rng.choice(len(mix), p=mix)))
        i += 1


def test_class_balanced_stream_reaches_target():
    target = np.full(7, 1 / 7)
    stage = ClassBalancedStream(target, seed=1, buffer_size=16)
    out = [label for _, (_, label) in zip(range(20_000), stage(_endless(MELD_MIX, 0)))]
    freq = np.bincount(out, minlength=7) / len(out)
    _within_5_sigma(freq, target, len(out))
    st_ = stage.stats
    assert st_["emitted"].sum() == 20_000
    assert np.all(st_["pulled"] >= st_["emitted"])
    assert st_["dropped"][0] > 0                              # majority class thinned
    # items pass through unchanged and at most once
    stage2 = ClassBalancedStream([0.2, 0.8], seed=2)
    items = [{"__key__": f"k{i}", "label_id": i % 2} for i in range(2000)]
    got = list(stage2(iter(items)))
    keys = [it["__key__"] for it in got]
    assert len(set(keys)) == len(keys) and all(isinstance(it, dict) for it in got)
    assert stage2.stats["emitted"].sum() + stage2.stats["dropped"].sum() == 2000


def test_class_balanced_stream_errors():
    with pytest.raises(ValueError, match="target class probabilities"):
        ClassBalancedStream([0.0, 0.0])
    with pytest.raises(ValueError, match="label id 5"):
        list(ClassBalancedStream([0.5, 0.5])(iter([("a", 5)])))
    stage = ClassBalancedStream([0.5, 0.5], patience=100)
    with pytest.raises(RuntimeError, match="class 1"):
        list(zip(range(1000), stage(("x", 0) for _ in iter(int, 1))))


def test_class_balanced_stream_in_webdataset_pipeline():
    wds = pytest.importorskip("webdataset")
    samples = [{"__key__": f"k{i}", "label_id": int(c)} for i, c in enumerate(_labels(4000, seed=3))]
    pipe = wds.DataPipeline(lambda: iter(samples), ClassBalancedStream([1, 1, 1, 1, 1, 1, 1], seed=0))
    out = [s["label_id"] for s in pipe]
    assert len(out) > 100
    assert np.bincount(out, minlength=7).min() > 0


def test_uniform_blocks_are_prefix_stable():
    """The draw relies on it: torch.rand(n) of a seeded generator is the first n of a longer draw."""
    long = torch.rand(1 << 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for n in (1, 67, 4096, 100_003):
        assert torch.equal(torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64), long[:n])
