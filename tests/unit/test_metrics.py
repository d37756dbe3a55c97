"""compute_metrics against scikit-learn, and the evaluator's per-rank sums (padding, coverage, predictions)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, recall_score)

from mmer_dist.train.evaluation import EvalAccumulator, EvalCoverageError, merge_rows
from mmer_dist.train.metrics import compute_metrics, write_metrics

LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
TOL = dict(rel=1e-12, abs=1e-15)


def assert_matches_sklearn(y: np.ndarray, p: np.ndarray, labels: list[str]) -> dict:
    ids = list(range(len(labels)))
    m = compute_metrics(y, p, labels)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, labels=ids, average="macro", zero_division=0), **TOL)
    assert m["weighted_f1"] == pytest.approx(f1_score(y, p, labels=ids, average="weighted", zero_division=0), **TOL)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p), **TOL)
    with warnings.catch_warnings():
        # balanced_accuracy_score warns when a predicted class never occurs in y_true: expected here
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(y, p)
    assert m["uar"] == pytest.approx(bal, **TOL)
    assert m["macro_recall"] == pytest.approx(recall_score(y, p, labels=ids, average="macro", zero_division=0), **TOL)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=ids, zero_division=0)
    for i, name in enumerate(labels):
        c = m["per_class"][name]
        assert c["precision"] == pytest.approx(prec[i], **TOL)
        assert c["recall"] == pytest.approx(rec[i], **TOL)
        assert c["f1"] == pytest.approx(f1[i], **TOL)
        assert c["support"] == int(sup[i])
    assert m["confusion_matrix"] == confusion_matrix(y, p, labels=ids).tolist()
    assert m["labels"] == labels and m["n"] == len(y)
    for key in ("macro_f1", "weighted_f1", "accuracy", "uar"):
        assert 0.0 <= m[key] <= 1.0
    json.dumps(m)  # plain JSON types only
    return m


def test_fixed_predictions_match_sklearn_and_hand_values():
    y = np.array([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 6])
    p = np.array([0, 0, 1, 1, 0, 2, 3, 4, 4, 6, 6, 0])
    m = assert_matches_sklearn(y, p, LABELS)
    # hand check: neutral tp=2, predicted 4, true 3 -> P=0.5, R=2/3, F1=4/7
    assert m["per_class"]["neutral"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["neutral"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["neutral"]["f1"] == pytest.approx(4 / 7)
    assert m["accuracy"] == pytest.approx(7 / 12)
    assert m["per_class"]["disgust"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_perfect_predictions():
    y = np.arange(7).repeat(3)
    m = assert_matches_sklearn(y, y.copy(), LABELS)
    assert m["macro_f1"] == m["weighted_f1"] == m["accuracy"] == m["uar"] == 1.0


def test_label_names_equal_label_ids():
    y = [0, 1, 2, 2, 6]
    p = [0, 2, 2, 1, 6]
    by_id = compute_metrics(y, p, LABELS)
    by_name = compute_metrics([LABELS[i] for i in y], [LABELS[i] for i in p], LABELS)
    assert by_id == by_name


@pytest.mark.parametrize("seed", range(12))
def test_random_predictions_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    labels = [f"c{i}" for i in range(k)]
    n = int(rng.integers(1, 300))
    y = rng.integers(0, k, n)
    # mostly-right predictions with noise, so every regime (good, bad, empty columns) appears
    p = np.where(rng.random(n) < rng.random(), y, rng.integers(0, k, n))
    assert_matches_sklearn(y, p, labels)


@pytest.mark.parametrize("seed", range(8))
def test_missing_classes_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    k = 7
    present = rng.choice(k, size=int(rng.integers(1, 5)), replace=False)
    n = int(rng.integers(1, 60))
    y = rng.choice(present, n)
    p = rng.integers(0, k, n)  # predictions may name classes absent from y_true
    m = assert_matches_sklearn(y, p, LABELS)
    for i, name in enumerate(LABELS):
        if i not in present:
            assert m["per_class"][name]["support"] == 0
            assert m["per_class"][name]["recall"] == 0.0
            assert m["per_class"][name]["f1"] == 0.0


def test_class_absent_from_both_listed_with_zeros():
    m = assert_matches_sklearn(np.array([0, 1, 1]), np.array([0, 1, 0]), LABELS)
    assert set(m["per_class"]) == set(LABELS)
    assert m["per_class"]["fear"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"y_pred\[1\] = 9 is not a label id"):
        compute_metrics([0, 1], [0, 9], LABELS)
    with pytest.raises(ValueError, match=r"y_true\[0\] = 'happy' is not a label"):
        compute_metrics(["happy"], ["joy"], LABELS)
    with pytest.raises(ValueError, match="2 entries but y_pred has 1"):
        compute_metrics([0, 1], [0], LABELS)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], [], LABELS)


def test_write_metrics_roundtrip(tmp_path):
    m = compute_metrics([0, 1, 2], [0, 1, 1], LABELS)
    path = write_metrics(m, tmp_path / "e" / "metrics.json")
    assert json.loads(path.read_text()) == m


# --------------------------------------------------------------------------- accumulator
def _probs(preds, k=len(LABELS)):
    out = np.full((len(preds), k), 0.01)
    out[np.arange(len(preds)), preds] = 1.0 - 0.01 * (k - 1)
    return out


def _split_dataset(n=23, seed=0):
    rng = np.random.default_rng(seed)
    keys = [f"meld-test-{i:05d}" for i in range(n)]
    y = rng.integers(0, len(LABELS), n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, len(LABELS), n))
    return keys, y, p


def _batch(torch, keys, y, positions, pad):
    """A collated batch's bookkeeping for `positions` (padding flags `pad`)."""
    return {"keys": [keys[i] for i in positions], "labels": torch.tensor([int(y[i]) for i in positions], dtype=torch.long),
            "index": torch.tensor(list(positions), dtype=torch.long), "pad": torch.tensor(pad, dtype=torch.bool)}


def _accumulate(keys, y, p, idx, pad_idx=(), batch=4, rows=None):
    """One rank's accumulator over samples `idx`, with padding duplicates `pad_idx` appended."""
    torch = pytest.importorskip("torch")
    acc = EvalAccumulator(LABELS, rows)
    order = list(idx) + list(pad_idx)
    flags = [False] * len(idx) + [True] * len(pad_idx)
    for s in range(0, len(order), batch):
        sel = order[s:s + batch]
        acc.add(_batch(torch, keys, y, sel, flags[s:s + batch]), torch.from_numpy(_probs(p[sel])))
    return acc


def test_single_rank_reduce_equals_compute_metrics():
    keys, y, p = _split_dataset()
    metrics = _accumulate(keys, y, p, range(len(keys))).reduce(len(keys))   # no process group: the sums as they are
    expected = compute_metrics(y, p, LABELS)
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["skipped"] == {} and metrics["unit"] == "utterance"


def test_two_ranks_sum_to_one_rank():
    """Rank 0 gets the even samples (12), rank 1 the odd ones (11) + one padding duplicate: their sums are
    the one-rank sums exactly (what the all-reduce adds up)."""
    keys, y, p = _split_dataset(n=23)
    one = _accumulate(keys, y, p, range(23))
    r0 = _accumulate(keys, y, p, range(0, 23, 2))
    r1 = _accumulate(keys, y, p, range(1, 23, 2), pad_idx=[1])
    assert np.array_equal(r0.cm + r1.cm, one.cm) and r0.count + r1.count == one.count == 23
    from mmer_dist.data.seeds import add_digests, range_digest

    assert add_digests(r0.digest, r1.digest) == one.digest == range_digest(23)


def test_padding_is_really_dropped():
    torch = pytest.importorskip("torch")
    keys, y, p = _split_dataset(n=10)
    acc = _accumulate(keys, y, p, range(10))
    wrong = (y[3] + 1) % len(LABELS)       # a wrongly-predicted copy of a sample: counting it would change the metrics
    acc.add(_batch(torch, keys, y, [3] * 5, [True] * 5), torch.from_numpy(_probs([wrong] * 5)))
    metrics = acc.reduce(10)
    assert metrics["macro_f1"] == compute_metrics(y, p, LABELS)["macro_f1"] and metrics["n"] == 10


def test_duplicate_or_missing_sample_is_an_error():
    keys, y, p = _split_dataset(n=10)
    dup = _accumulate(keys, y, p, [*range(10), 5][1:])          # sample 0 lost, sample 5 twice: same count
    with pytest.raises(EvalCoverageError, match="not each exactly once"):
        dup.reduce(10)
    with pytest.raises(EvalCoverageError, match="evaluated 9 samples"):
        _accumulate(keys, y, p, range(9)).reduce(10)


def test_skipped_samples_count_as_covered():
    torch = pytest.importorskip("torch")
    keys, y, p = _split_dataset(n=6)
    acc = _accumulate(keys, y, p, range(5))
    acc.add({**_batch(torch, keys, y, [], []), "skipped": {"audio_corrupt": 1}, "skipped_index": [5]},
            torch.zeros(0, len(LABELS)))
    metrics = acc.reduce(6)
    assert metrics["skipped"] == {"audio_corrupt": 1} and metrics["n"] == 5


@pytest.mark.parametrize("order", ["ascending", "interleaved"])
def test_rows_of_the_ranks_merge_in_split_order(tmp_path, order):
    keys, y, p = _split_dataset(n=9)
    # a streaming eval loader's workers interleave their batches: a rank's rows need not ascend
    mine = [0, 2, 4, 6, 8] if order == "ascending" else [4, 6, 0, 8, 2]
    r0 = _accumulate(keys, y, p, mine, rows=tmp_path / "r0.jsonl")
    r1 = _accumulate(keys, y, p, range(1, 9, 2), pad_idx=[1], rows=tmp_path / "r1.jsonl")
    for acc in (r0, r1):
        acc._rows.close()
    merge_rows([tmp_path / "r0.jsonl", tmp_path / "r1.jsonl"], tmp_path / "predictions.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(9)) and [r["key"] for r in rows] == keys
    assert rows[0]["label"] == LABELS[y[0]] and rows[0]["prediction"] == LABELS[p[0]]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert not (tmp_path / "r0.jsonl").exists()
