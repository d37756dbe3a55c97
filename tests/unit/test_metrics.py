"""compute_metrics against scikit-learn, and EvalAccumulator's cross-rank merge (padding, duplicates, order)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, recall_score)

from mmer_dist.train.metrics import (EvalAccumulator, EvalGatherError, compute_metrics, merge_payloads,
                                     write_metrics)

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


def _accumulate(keys, y, p, idx, pad_idx=(), batch=4, losses=None):
    """One rank's accumulator over samples `idx`, with padding duplicates `pad_idx` appended."""
    acc = EvalAccumulator(LABELS)
    order = list(idx) + list(pad_idx)
    flags = [False] * len(idx) + [True] * len(pad_idx)
    for s in range(0, len(order), batch):
        sel = order[s:s + batch]
        acc.add([keys[i] for i in sel], y[sel], _probs(p[sel]), is_padding=flags[s:s + batch],
                losses=None if losses is None else losses[sel])
    return acc


def test_single_rank_gather_equals_compute_metrics():
    keys, y, p = _split_dataset()
    acc = _accumulate(keys, y, p, range(len(keys)))
    res = acc.gather()  # no process group: all_gather_object returns [payload]
    assert res.metrics == compute_metrics(y, p, LABELS)
    assert [r["key"] for r in res.rows] == sorted(keys)
    assert res.padding_dropped == 0 and res.ranks == 1


def test_two_ranks_with_padding_identical_to_one_rank():
    keys, y, p = _split_dataset(n=23)
    losses = np.random.default_rng(1).random(len(keys))
    one = _accumulate(keys, y, p, range(23), losses=losses).gather()
    # rank 0 gets the even samples (12), rank 1 the odd ones (11) + one padding duplicate of sample 1
    r0 = _accumulate(keys, y, p, range(0, 23, 2), losses=losses)
    r1 = _accumulate(keys, y, p, range(1, 23, 2), pad_idx=[1], losses=losses)
    assert len(r0) == len(r1) == 12  # equal steps per rank
    two = r0.gather(gathered=[r0.payload(), r1.payload()], expected_keys=keys)
    assert two.padding_dropped == 1 and two.ranks == 2
    assert two.metrics == one.metrics
    assert two.rows == one.rows
    assert two.metrics["loss"] == pytest.approx(float(np.mean(losses)))
    # rank order does not matter either
    swapped = merge_payloads([r1.payload(), r0.payload()], LABELS, expected_keys=keys)
    assert swapped.metrics == one.metrics and swapped.rows == one.rows


def test_padding_is_really_dropped():
    keys, y, p = _split_dataset(n=10)
    # pad with a wrongly-predicted copy of a sample: counting it would change the metrics
    acc = _accumulate(keys, y, p, range(10))
    wrong = (y[3] + 1) % len(LABELS)
    acc.add([keys[3]] * 5, [int(y[3])] * 5, _probs([wrong] * 5), is_padding=[True] * 5)
    res = acc.gather()
    assert res.metrics == compute_metrics(y, p, LABELS)
    assert res.metrics["n"] == 10 and res.padding_dropped == 5


def test_duplicate_key_is_an_error():
    keys, y, p = _split_dataset(n=10)
    r0 = _accumulate(keys, y, p, range(0, 6))
    r1 = _accumulate(keys, y, p, range(5, 10))  # sample 5 on both ranks, not flagged as padding
    with pytest.raises(EvalGatherError, match=r"counted more than once.*meld-test-00005"):
        r0.gather(gathered=[r0.payload(), r1.payload()])


def test_missing_key_is_an_error():
    keys, y, p = _split_dataset(n=10)
    r0 = _accumulate(keys, y, p, range(0, 5))
    r1 = _accumulate(keys, y, p, range(6, 10), pad_idx=[6])  # sample 5 lost
    with pytest.raises(EvalGatherError, match=r"1 keys missing \(first: \['meld-test-00005'\]\)"):
        r0.gather(gathered=[r0.payload(), r1.payload()], expected_keys=keys)
    with pytest.raises(EvalGatherError, match="1 unexpected"):
        r0.gather(gathered=[r0.payload(), r1.payload()], expected_keys=keys[:5] + keys[6:9])


def test_all_padding_is_an_error():
    acc = EvalAccumulator(LABELS)
    acc.add(["a"], [0], _probs([0]), is_padding=[True])
    with pytest.raises(EvalGatherError, match="no eval rows"):
        acc.gather()


def test_preds_default_to_argmax_and_explicit_preds_win():
    acc = EvalAccumulator(LABELS)
    acc.add(["a", "b"], [1, 2], _probs([1, 0]))
    assert acc.preds == [1, 0]
    acc.add(["c"], [3], _probs([0]), preds=[3])
    assert acc.preds[-1] == 3


def test_add_validates_shapes():
    acc = EvalAccumulator(LABELS)
    with pytest.raises(ValueError, match=r"probs has shape \(2, 3\), expected \(2, 7\)"):
        acc.add(["a", "b"], [0, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="batch sizes disagree"):
        acc.add(["a", "b"], [0], _probs([0, 1]))


def test_accepts_torch_tensors_and_writes_predictions(tmp_path):
    torch = pytest.importorskip("torch")
    acc = EvalAccumulator(LABELS)
    logits = torch.tensor([[2.0, 0, 0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0, 0]], dtype=torch.bfloat16)
    acc.add(["k2", "k1"], torch.tensor([0, 1]), logits.softmax(-1), is_padding=torch.tensor([False, False]))
    res = acc.gather()
    paths = res.write(tmp_path / "ev")
    rows = [json.loads(x) for x in paths["predictions"].read_text().splitlines()]
    assert [r["key"] for r in rows] == ["k1", "k2"]
    assert rows[0]["label"] == "joy" and rows[0]["prediction"] == "surprise"
    assert set(rows[0]["probabilities"]) == set(LABELS)
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-2)
    assert json.loads(paths["metrics"].read_text())["accuracy"] == 0.5
