"""docs/faults.md stays true: every row names at least one test, and every named test exists (a top-level
`def test_...` in that file). Rows marked TODO-16 are issue 16's to fill and are skipped."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "faults.md"
NODE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
FAULT_CLASSES = (   # issue 17's table (the compare row belongs to another part of the work) and its "handled well" list
    "model.fusion.width", "optim.lr=5e-3", "empty or missing run folder", "Ctrl-C (SIGINT) during `train`",
    "`index.json`, `pack.json`, a `*.stats.json`", "`predict --audio plot.png`", "`synth meld --n 60`",
    "`train.max_steps=-5`", "the learning rate", "an empty RAVDESS wav", "RUN/checkpoints/step-N", "DeepSpeed",
    "wrong header", "unknown emotion label", "zero-length media", "malformed RAVDESS", "not a corpus",
    "made with other arguments", "misspelled or mistyped override", "Ctrl-C during `pack`", "killed", "SIGTERM",
    "a damaged shard",
)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of every markdown table in `text`, as lists of cells."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|- ") or line.startswith("| fault |"):
            continue
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def missing_tests(text: str, repo: Path) -> list[str]:
    """Rows naming no test, and named tests that do not exist, as readable problems."""
    problems = []
    for cells in table_rows(text):
        if "TODO-16" in cells[-1]:
            continue
        nodes = NODE.findall(cells[-1])
        if not nodes:
            problems.append(f"row {cells[0][:60]!r} names no test")
        for path, name in nodes:
            file = repo / path
            defined = {n.name for n in ast.parse(file.read_text(encoding="utf-8")).body
                       if isinstance(n, ast.FunctionDef)} if file.is_file() else set()
            if name not in defined:
                problems.append(f"{path}::{name} does not exist")
    return problems


def test_every_row_names_tests_that_exist():
    assert missing_tests(TABLE.read_text(encoding="utf-8"), REPO) == []


def test_every_fault_class_of_the_issue_has_a_row():
    faults = " ".join(cells[0] for cells in table_rows(TABLE.read_text(encoding="utf-8")))
    assert [c for c in FAULT_CLASSES if c not in faults] == []


def test_the_checker_finds_a_missing_test_and_a_row_without_one(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_here():\n    pass\n")
    text = ("| fault | what | proven by |\n|---|---|---|\n"
            "| a | b | `tests/test_x.py::test_here` |\n| c | d | `tests/test_x.py::test_gone` |\n| e | f | none |\n"
            "| g | TODO-16 | TODO-16: `tests/unit/test_shard_faults.py::...` |\n")
    assert missing_tests(text, tmp_path) == ["tests/test_x.py::test_gone does not exist", "row 'e' names no test"]


def test_the_readme_links_the_table():
    assert "(docs/faults.md)" in (REPO / "README.md").read_text(encoding="utf-8")
