"""Sweep summaries, ensembles and `compare A B` on hand-made evaluation folders (no training): the
figures equal scikit-learn/scipy computed independently, dev and test stay apart, choices made on the
summarised split are flagged, and sample sets that differ are refused with the count and an example."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import f1_score

from mmer_dist import cli
from mmer_dist.corpora.ravdess import RavdessName
from mmer_dist.experiments.predictions import (SampleMismatchError, check_same_samples, ensemble, load_predictions,
                                               unit_from_key)
from mmer_dist.experiments.summary import summarize
from mmer_dist.train.metrics import compute_metrics, write_metrics


def write_predictions(rows, path):
    """predictions.jsonl as the evaluator writes it: one JSON row per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

LABELS = ["neutral", "calm", "happy", "sad"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _key(actor: int, i: int) -> str:
    emotion, rest = divmod(i, 4)
    return RavdessName("03", "01", f"{emotion % 4 + 1:02d}", "01", f"{rest % 2 + 1:02d}", f"{rest // 2 + 1:02d}",
                       f"{actor:02d}").key


def _eval(folder: Path, keys: list[str], y: np.ndarray, probs: np.ndarray, split: str, **extra) -> None:
    metrics = {**compute_metrics(y, probs.argmax(1), LABELS), "split": split, **extra}
    write_metrics(metrics, folder / "metrics.json")
    write_predictions([{"key": k, "label": LABELS[t], "prediction": LABELS[int(p.argmax())],
                        "probabilities": dict(zip(LABELS, map(float, p)))} for k, t, p in zip(keys, y, probs)],
                      folder / "predictions.jsonl")


def _samples(actors: list[int]) -> tuple[list[str], np.ndarray]:
    keys = [_key(a, i) for a in actors for i in range(16)]
    return keys, np.array([int(k.split("-")[2]) - 1 for k in keys])


def _probs(y: np.ndarray, seed: int, skill: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (y.size, len(LABELS)))
    logits[np.arange(y.size), y] += skill
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def _sweep(root: Path, seeds: list[int], folds: int = 0, skill: float = 1.0, selected_on: str = "dev",
           variants: list[dict] | None = None) -> Path:
    """A sweep folder as `mmer-dist sweep` leaves it: sweep.json, run folders (dev) with eval-test/."""
    runs = []
    for variant in variants or [{}]:
        for fold in range(folds) if folds else [None]:
            for seed in seeds:
                name = "_".join([*(f"{k}={v}" for k, v in variant.items()), *([f"fold{fold}"] if folds else []),
                                 f"seed{seed}"])
                run = root / name
                test_actors = [fold * 2 + 1, fold * 2 + 2] if folds else [9, 10]
                keys, y = _samples(test_actors)
                _eval(run / "eval-test", keys, y, _probs(y, 100 * seed + (fold or 0), skill), "test",
                      selected_on=selected_on)
                dkeys, dy = _samples([7, 8])
                _eval(run, dkeys, dy, _probs(dy, 1000 + seed, skill), "dev", selected_on=selected_on)
                runs.append({"name": name, "seed": seed, "fold": fold, "variant": variant})
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"version": 1, "runs": runs}))
    return root


# --------------------------------------------------------------------------- predictions
def test_unit_from_key_knows_meld_dialogues_and_ravdess_actors():
    assert unit_from_key("meld-dev-dia12_utt3") == ("dialogue", "dev-dia12")
    assert unit_from_key(RavdessName("01", "01", "05", "02", "01", "02", "17").key) == ("speaker", "actor17")
    assert unit_from_key("synthetic-000042") == ("utterance", "synthetic-000042")


def test_load_predictions_derives_or_reads_units(tmp_path):
    keys, y = _samples([3, 4])
    _eval(tmp_path / "e", keys[::-1], y[::-1], _probs(y[::-1], 0, 1.0), "test")
    p = load_predictions(tmp_path / "e")
    assert p.keys == sorted(keys) and p.unit == "speaker" and set(p.groups) == {"actor03", "actor04"}
    assert p.split == "test" and p.probs.shape == (32, 4)
    rows = [dict(json.loads(line), group=f"g{i % 3}") for i, line in
            enumerate((tmp_path / "e" / "predictions.jsonl").read_text().splitlines())]
    write_predictions(rows, tmp_path / "e" / "predictions.jsonl")
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    write_metrics({**m, "unit": "dialogue"}, tmp_path / "e" / "metrics.json")   # recorded fields win over keys
    p = load_predictions(tmp_path / "e")
    assert p.unit == "dialogue" and set(p.groups) == {"g0", "g1", "g2"}


def test_missing_predictions_name_the_command_that_writes_them(tmp_path):
    run = _sweep(tmp_path / "sw", [0]) / "seed0"
    (run / "predictions.jsonl").unlink()
    (run / "config.yaml").write_text("train: {select: best}\n")
    with pytest.raises(FileNotFoundError, match=rf"mmer-dist eval --model {run} .*--split dev --out {run}/eval-dev"):
        load_predictions(run)


def test_different_samples_are_refused_with_count_and_example(tmp_path):
    keys, y = _samples([1, 2])
    _eval(tmp_path / "a", keys, y, _probs(y, 0, 1.0), "test")
    _eval(tmp_path / "b", keys[:-1], y[:-1], _probs(y[:-1], 1, 1.0), "test")
    a, b = load_predictions(tmp_path / "a"), load_predictions(tmp_path / "b")
    with pytest.raises(SampleMismatchError, match=rf"1 keys only in the first, 0 only in the second \(e.g. {max(keys)}\)"):
        check_same_samples([a, b], ["A", "B"])


def test_ensemble_is_the_mean_of_the_members_probabilities(tmp_path):
    keys, y = _samples([1, 2])
    members = []
    for s in range(3):
        _eval(tmp_path / f"r{s}", keys, y, _probs(y, s, 0.5), "test")
        members.append(load_predictions(tmp_path / f"r{s}"))
    e = ensemble(members)
    manual = np.mean([m.probs for m in members], axis=0)
    assert np.allclose(e.probs, manual) and (e.y_pred == manual.argmax(1)).all()


# --------------------------------------------------------------------------- summarize
def _macro(folder: Path) -> float:
    p = load_predictions(folder)
    return f1_score(p.y_true, p.y_pred, labels=range(len(LABELS)), average="macro", zero_division=0)


def test_summary_of_three_seeds(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sw", [0, 1, 2])
    assert cli.main(["summarize", str(sweep)]) == 0
    assert "test: 3 runs" in capsys.readouterr().out
    s = json.loads((sweep / "summary.json").read_text())
    assert (sweep / "summary.png").read_bytes()[:8] == PNG_MAGIC
    values = [_macro(sweep / f"seed{i}" / "eval-test") for i in range(3)]
    m = s["metrics"]["macro_f1"]
    assert s["runs"] == 3 and s["split"] == "test"
    assert m["mean"] == pytest.approx(np.mean(values)) and m["std"] == pytest.approx(np.std(values, ddof=1))
    assert m["ci95"] == pytest.approx(list(sps.t.interval(0.95, 2, np.mean(values), sps.sem(values))))
    assert set(s["per_class"]) == set(LABELS) and "ci95" in s["per_class"]["sad"]["f1"]
    members = [load_predictions(sweep / f"seed{i}" / "eval-test") for i in range(3)]
    mean = np.mean([p.probs for p in members], axis=0)
    assert s["ensemble"]["members"] == 3
    assert s["ensemble"]["metrics"]["macro_f1"] == pytest.approx(
        f1_score(members[0].y_true, mean.argmax(1), labels=range(4), average="macro", zero_division=0))
    # dev kept apart, and flagged: every checkpoint was chosen on it
    dev = s["other_splits"]["dev"]
    assert dev["metrics"]["macro_f1"]["mean"] == pytest.approx(np.mean([_macro(sweep / f"seed{i}") for i in range(3)]))
    assert dev["selection"]["chosen_on_this_split"] == ["seed0", "seed1", "seed2"] and "optimistic" in dev["selection"]["warning"]
    assert s["selection"]["chosen_on_this_split"] == [] and "warning" not in s["selection"]
    assert cli.main(["summarize", str(sweep), "--split", "dev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "dev"


def test_summary_flags_checkpoints_chosen_on_test(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sw", [0, 1], selected_on="test")
    assert cli.main(["summarize", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the checkpoint of 2 of 2 runs was chosen on test" in out
    assert json.loads((sweep / "summary.json").read_text())["selection"]["chosen_on_this_split"] == ["seed0", "seed1"]


def test_summary_of_one_run_has_no_interval(tmp_path):
    s = summarize(_sweep(tmp_path / "sw", [0]))
    assert s["metrics"]["macro_f1"]["ci95"] is None and s["metrics"]["macro_f1"]["std"] is None
    assert "one run" in s["metrics"]["macro_f1"]["note"]


def test_fold_sweep_pools_folds_and_ensembles_per_fold(tmp_path):
    s = summarize(_sweep(tmp_path / "sw", [0, 1], folds=2))
    assert s["runs"] == 4 and s["metrics"]["macro_f1"]["n"] == 4
    assert s["pooled"]["seeds"] == 2 and s["pooled"]["n"] == 64      # 2 folds x 2 actors x 16 clips, each once
    boot = s["pooled"]["bootstrap"]                                  # the pooled figures' intervals over actors
    assert (boot["unit"], boot["units"], boot["n"]) == ("speaker", 4, 64)
    assert boot["metrics"]["macro_f1"]["value"] == pytest.approx(s["pooled"]["metrics"]["macro_f1"]["mean"])
    lo, hi = boot["metrics"]["uar"]["ci95"]
    assert lo <= boot["metrics"]["uar"]["value"] <= hi
    assert s["ensemble"]["members"] == 2 and s["ensemble"]["folds"] == 2 and s["ensemble"]["n"] == 64
    dev = s["other_splits"]["dev"]            # every fold's dev holds actors 7-8 here: not pooled
    assert "pooled" not in dev and set(dev["ensemble"]["per_fold"]) == {"0", "1"}


def test_variants_are_summarised_apart(tmp_path):
    s = summarize(_sweep(tmp_path / "sw", [0, 1], variants=[{"optim.lr": "1e-3"}, {"optim.lr": "3e-4"}]))
    assert set(s["variants"]) == {"optim.lr=1e-3", "optim.lr=3e-4"}
    assert all(v["runs"] == 2 for v in s["variants"].values())


# --------------------------------------------------------------------------- compare A B
def test_compare_two_sweeps_json_contract(tmp_path, capsys):
    a = _sweep(tmp_path / "a", [0, 1], skill=2.0)
    b = _sweep(tmp_path / "b", [0, 1], skill=0.5)
    assert cli.main(["compare", str(a), str(b), "--json", "--resamples", "2000"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"metric", "a", "b", "difference", "ci95", "p_value", "unit"} <= r.keys()
    assert r["metric"] == "macro_f1" and r["unit"] == "speaker" and r["units"] == 2 and r["split"] == "test"
    mean_a = np.mean([_macro(a / f"seed{i}" / "eval-test") for i in range(2)])
    mean_b = np.mean([_macro(b / f"seed{i}" / "eval-test") for i in range(2)])
    assert r["difference"] == pytest.approx(mean_a - mean_b) and r["runs"] == {"a": 2, "b": 2}
    assert r["ci95"][0] <= r["difference"] <= r["ci95"][1] and set(r["per_class"]) == set(LABELS)


def test_runs_joined_by_commas_compare_like_the_sweep_of_them(tmp_path, capsys):
    a = _sweep(tmp_path / "a", [0, 1], skill=2.0)
    b = _sweep(tmp_path / "b", [0, 1], skill=0.5)
    assert cli.main(["compare", str(a), str(b), "--json", "--resamples", "500"]) == 0
    swept = json.loads(capsys.readouterr().out)
    listed = [",".join(str(s / f"seed{i}") for i in range(2)) for s in (a, b)]
    assert cli.main(["compare", *listed, "--split", "test", "--resamples", "500"]) == 0   # no table: the test only
    out = capsys.readouterr().out
    assert "(2 run(s))" in out and f"A-B {swept['difference']:+.4f}" in out
    assert f"[{swept['ci95'][0]:+.4f}, {swept['ci95'][1]:+.4f}]" in out
    assert cli.main(["compare", *listed, str(a), "--split", "test"]) == 2
    assert "compares with exactly one other" in capsys.readouterr().err


def test_compare_two_runs_prints_the_table_and_the_paired_test(tmp_path, capsys):
    a = _sweep(tmp_path / "a", [0], skill=2.0) / "seed0"
    b = _sweep(tmp_path / "b", [0], skill=0.5) / "seed0"
    assert cli.main(["compare", str(a), str(b), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["split", "test", "test"]
    assert "paired bootstrap" in out and "split test, 32 samples in 2 speakers" in out


def test_compare_refuses_different_sample_sets(tmp_path, capsys):
    keys, y = _samples([1, 2])
    _eval(tmp_path / "a", keys, y, _probs(y, 0, 1.0), "test")
    _eval(tmp_path / "b", keys[1:] + [_key(5, 0)], np.r_[y[1:], 0], _probs(np.r_[y[1:], 0], 1, 1.0), "test")
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "1 keys only in the first, 1 only in the second" in err and f"e.g. {min(keys)}" in err
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2   # the table refuses too
    assert "hold different samples" in capsys.readouterr().err


def test_damaged_files_are_named(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sw", [0, 1])
    (sweep / "seed1" / "metrics.json").write_text("{not json")
    assert cli.main(["summarize", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert f"{sweep / 'seed1' / 'metrics.json'} is not valid JSON" in err and "re-run" in err
    (sweep / "sweep.json").write_text("[")
    assert cli.main(["summarize", str(sweep)]) == 2
    assert f"{sweep / 'sweep.json'} is not valid JSON" in capsys.readouterr().err


def test_two_runs_without_predictions_still_get_the_table(tmp_path, capsys):
    keys, y = _samples([1, 2])
    for name, seed in (("a", 0), ("b", 1)):
        _eval(tmp_path / name, keys, y, _probs(y, seed, 1.0), "test")
        (tmp_path / name / "predictions.jsonl").unlink()
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("metric") and "no paired test: no predictions.jsonl beside" in out
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 2   # --json needs the test
    assert "mmer-dist eval" in capsys.readouterr().err
