"""Plots are valid PNGs with the expected panels; tables and `mmer-dist compare` show every run and class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmer_dist import cli
from mmer_dist.report import (MetricsNotFoundError, MixedComparisonError, compare_runs, format_compare, load_metrics, plot_confusion,
                              plot_curves, plot_per_class_f1, print_table, read_log, write_eval_report)
from mmer_dist.train.metrics import compute_metrics, write_metrics

LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(seed: int, acc: float = 0.6, labels: list[str] = LABELS) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(labels), 80)
    p = np.where(rng.random(80) < acc, y, rng.integers(0, len(labels), 80))
    return compute_metrics(y, p, labels)


def _assert_png(path: Path, fig) -> np.ndarray:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    w, h = fig.get_size_inches() * fig.dpi
    assert img.shape[:2] == (round(h), round(w))
    assert img.std() > 0.01  # something was drawn
    return img


def _axis_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _write_log(run: Path, bad_line: bool = False) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(10, 101, 10):
        lines.append({"step": step, "epoch": step // 50, "split": "train", "loss": 2.0 / step ** 0.3,
                      "lr": 1e-3 * min(1, step / 30), "samples_per_s": 50.0})
        if step % 20 == 0:
            lines.append({"step": step, "epoch": step // 50, "split": "dev", "macro_f1": step / 120,
                          "weighted_f1": step / 110, "accuracy": step / 105, "uar": step / 120, "loss": 1.0})
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    if bad_line:
        text += '{"step": 110, "split": "tra\n'  # a line cut by a kill
    (run / "log.jsonl").write_text(text)


def test_module_import_has_no_matplotlib_side_effect():
    code = "import sys, mmer_dist.report, mmer_dist.train.metrics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plot_confusion_two_annotated_panels(tmp_path):
    m = _metrics(0)
    fig = plot_confusion(m, tmp_path / "c" / "confusion.png")
    _assert_png(tmp_path / "c" / "confusion.png", fig)
    axes = fig.get_axes()
    assert len(axes) == 2
    counts, norm = axes
    k = len(LABELS)
    assert len(_axis_texts(counts)) == k * k and len(_axis_texts(norm)) == k * k
    cm = np.array(m["confusion_matrix"])
    assert _axis_texts(counts)[0] == str(cm[0, 0])  # row 0, column 0 annotation is the count
    assert _axis_texts(norm)[0] == f"{cm[0, 0] / cm[0].sum():.2f}"
    for ax in axes:
        assert ax.get_xlabel() == "predicted label" and ax.get_ylabel() == "true label"
        assert [t.get_text() for t in ax.get_xticklabels()] == LABELS


def test_plot_confusion_class_without_samples_has_zero_row(tmp_path):
    m = compute_metrics([0, 0, 1], [0, 1, 1], LABELS)  # most classes absent
    fig = plot_confusion(m, tmp_path / "c.png")
    _assert_png(tmp_path / "c.png", fig)
    norm_texts = _axis_texts(fig.get_axes()[1])
    assert "nan" not in " ".join(norm_texts)


def test_plot_per_class_f1_bars_support_and_macro_line(tmp_path):
    m = _metrics(1)
    fig = plot_per_class_f1(m, tmp_path / "f1.png")
    _assert_png(tmp_path / "f1.png", fig)
    (ax,) = fig.get_axes()
    assert len(ax.patches) == len(LABELS)
    assert [p.get_height() for p in ax.patches] == pytest.approx([m["per_class"][x]["f1"] for x in LABELS])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == f"neutral\n(n={m['per_class']['neutral']['support']})"
    hlines = [ln for ln in ax.get_lines() if ln.get_ydata()[0] == ln.get_ydata()[-1]]
    assert any(ln.get_ydata()[0] == pytest.approx(m["macro_f1"]) for ln in hlines)


def test_plot_curves_three_panels_from_log(tmp_path):
    run = tmp_path / "run"
    _write_log(run)
    fig = plot_curves(run, tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png", fig)
    loss_ax, lr_ax, f1_ax = fig.get_axes()
    train_loss = loss_ax.get_lines()[0]
    assert list(train_loss.get_xdata()) == list(range(10, 101, 10))
    assert len(lr_ax.get_lines()) == 1
    f1_labels = sorted(ln.get_label() for ln in f1_ax.get_lines())
    assert f1_labels == ["dev macro-f1", "dev weighted-f1"]
    assert list(f1_ax.get_lines()[0].get_xdata()) == [20, 40, 60, 80, 100]


def test_plot_curves_counts_bad_lines_and_keeps_last_of_repeated_steps(tmp_path):
    run = tmp_path / "run"
    _write_log(run, bad_line=True)
    with (run / "log.jsonl").open("a") as f:  # a resumed run logs step 100 again
        f.write(json.dumps({"step": 100, "split": "train", "loss": 0.01, "lr": 1e-4}) + "\n")
    rows, bad = read_log(run / "log.jsonl")
    assert bad == [16]
    with pytest.warns(UserWarning, match=r"1 lines are not JSON objects.*lines \[16\]"):
        fig = plot_curves(run, tmp_path / "curves.png")
    loss = fig.get_axes()[0].get_lines()[0]
    assert list(loss.get_xdata()).count(100) == 1 and loss.get_ydata()[-1] == 0.01


def test_plot_curves_without_eval_lines_still_draws(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0, "lr": 0.1}) + "\n")
    fig = plot_curves(run, tmp_path / "curves.png")
    assert len(fig.get_axes()) == 3
    assert "no eval metrics" in " ".join(_axis_texts(fig.get_axes()[2]))


def test_plot_curves_missing_log_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "log.jsonl")):
        plot_curves(tmp_path / "nowhere", tmp_path / "x.png")


def test_print_table_lists_classes_and_headline():
    m = _metrics(2)
    table = print_table(m)
    lines = table.splitlines()
    for name in LABELS:
        row = next(ln for ln in lines if ln.startswith(name + " "))
        c = m["per_class"][name]
        assert f"{c['f1']:.4f}" in row and row.rstrip().endswith(str(c["support"]))
    for key in ("macro_f1", "weighted_f1", "accuracy", "uar"):
        assert any(ln.startswith(key) and f"{m[key]:.4f}" in ln for ln in lines)


def test_write_eval_report_writes_all_plots(tmp_path):
    run = tmp_path / "run"
    _write_log(run)
    paths = write_eval_report(_metrics(3), tmp_path / "ev", run_dir=run)
    assert sorted(paths) == ["confusion", "curves", "per_class_f1"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths.values())


# --------------------------------------------------------------------------- compare
def _runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = tmp_path / "baseline"
    write_metrics(_metrics(4, acc=0.5), base / "metrics.json")                # a run folder
    weighted = tmp_path / "weighted"
    write_metrics(_metrics(5, acc=0.8), weighted / "eval" / "metrics.json")   # an eval folder
    other = tmp_path / "third" / "metrics.json"                               # a metrics.json path
    write_metrics(_metrics(6, acc=0.7), other)
    return base, weighted / "eval", other


def test_compare_table_has_all_runs_classes_and_deltas(tmp_path):
    base, weighted_eval, other = _runs(tmp_path)
    cmp = compare_runs([base, weighted_eval, other])
    names = [r["name"] for r in cmp["runs"]]
    assert names == ["baseline", "eval", "third"]
    assert list(cmp["rows"]) == ["macro_f1", "weighted_f1", "accuracy", "uar"] + [f"f1/{x}" for x in LABELS]
    mb, mw = load_metrics(base), load_metrics(weighted_eval)
    assert cmp["deltas"]["eval"]["macro_f1"] == pytest.approx(mw["macro_f1"] - mb["macro_f1"])
    assert cmp["deltas"]["eval"]["f1/fear"] == pytest.approx(mw["per_class"]["fear"]["f1"] - mb["per_class"]["fear"]["f1"])
    table = format_compare(cmp)
    header = table.splitlines()[0]
    for n in names:
        assert n in header
    assert "Δ eval" in header and "Δ third" in header
    for x in LABELS:
        assert any(ln.startswith(f"f1/{x}") for ln in table.splitlines())
    row = next(ln for ln in table.splitlines() if ln.startswith("macro_f1"))
    assert f"{mb['macro_f1']:.4f}" in row and f"{mw['macro_f1'] - mb['macro_f1']:+.4f}" in row


def test_compare_cli_prints_and_writes_json_and_png(tmp_path, capsys):
    base, weighted_eval, other = _runs(tmp_path)
    out = tmp_path / "cmp"
    rc = cli.main(["compare", str(base), str(weighted_eval), str(other), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "f1/disgust" in printed
    data = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["baseline", "eval", "third"]
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_same_folder_names_are_disambiguated(tmp_path):
    a = tmp_path / "a" / "eval"
    b = tmp_path / "b" / "eval"
    write_metrics(_metrics(7), a / "metrics.json")
    write_metrics(_metrics(8), b / "metrics.json")
    assert [r["name"] for r in compare_runs([a, b])["runs"]] == ["a/eval", "b/eval"]


def test_compare_different_label_sets_shows_dash(tmp_path):
    write_metrics(_metrics(9, labels=["neutral", "joy"]), tmp_path / "m" / "metrics.json")
    write_metrics(_metrics(10, labels=["neutral", "calm"]), tmp_path / "r" / "metrics.json")
    with pytest.raises(MixedComparisonError, match="different label sets.*--allow-mixed"):
        compare_runs([tmp_path / "m", tmp_path / "r"])
    cmp = compare_runs([tmp_path / "m", tmp_path / "r"], allow_mixed=True)
    assert cmp["labels"] == ["neutral", "joy", "calm"]
    assert cmp["rows"]["f1/calm"]["m"] is None and cmp["deltas"]["r"]["f1/calm"] is None
    assert "-" in next(ln for ln in format_compare(cmp).splitlines() if ln.startswith("f1/calm"))


def test_compare_shows_split_and_n_and_refuses_mixed_columns(tmp_path, capsys):
    """Issue 17: `compare RUN EVAL_DIR` set a dev figure against a test figure with no split shown."""
    dev, test = _metrics(11), _metrics(12)
    dev["split"], test["split"] = "dev", "test"
    write_metrics(dev, tmp_path / "run" / "metrics.json")
    write_metrics(test, tmp_path / "run" / "eval-test" / "metrics.json")
    write_metrics(test, tmp_path / "other" / "eval-test" / "metrics.json")
    assert cli.main(["compare", str(tmp_path / "run"), str(tmp_path / "run" / "eval-test")]) == 2
    err = capsys.readouterr().err
    assert "different splits" in err and "run: dev" in err and "eval-test: test" in err and "--allow-mixed" in err
    assert cli.main(["compare", str(tmp_path / "run"), str(tmp_path / "run" / "eval-test"), "--allow-mixed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["split", "dev", "test"] and lines[2].split() == ["n", "80", "80"]
    smaller = _metrics(13)
    smaller["n"] = 79
    write_metrics(smaller, tmp_path / "small" / "metrics.json")
    with pytest.raises(MixedComparisonError, match=r"different numbers of samples \(eval-test: 80, small: 79\)"):
        compare_runs([tmp_path / "run" / "eval-test", tmp_path / "small"])
    for d, keys in (("run/eval-test", ["a", "b"]), ("other/eval-test", ["a", "c"])):   # same n, other samples
        (tmp_path / d / "predictions.jsonl").write_text("".join(json.dumps({"key": k}) + "\n" for k in keys))
    with pytest.raises(MixedComparisonError, match=r"1 keys only in .*run/eval-test/predictions.jsonl.*\(e.g. b\)"):
        compare_runs([tmp_path / "run" / "eval-test", tmp_path / "other" / "eval-test"])


def test_compare_missing_metrics_names_path_and_fix(tmp_path, capsys):
    base, _, _ = _runs(tmp_path)
    empty_run = tmp_path / "unevaluated"
    empty_run.mkdir()
    with pytest.raises(MetricsNotFoundError, match=r"no metrics.json in .*unevaluated.*mmer-dist eval"):
        compare_runs([base, empty_run])
    rc = cli.main(["compare", str(base), str(empty_run)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(empty_run / "metrics.json") in err and "mmer-dist eval" in err
    with pytest.raises(MetricsNotFoundError, match="does not exist"):
        compare_runs([tmp_path / "typo" / "metrics.json"])


def test_compare_rejects_non_metrics_json(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.json").write_text("{\"step\": 3}")
    with pytest.raises(ValueError, match="no per_class entry"):
        compare_runs([tmp_path / "x"])
