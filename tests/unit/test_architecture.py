"""The structure docs/architecture.md describes, checked: no import cycle, models never see the data layer,
only dist.py touches torch.distributed, short modules with a docstring each."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mmer_dist"
MAX_LINES = 460          # "no module over ~450 lines" (STYLE.md: split past ~600; the project keeps to 450)


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its body (function-local and TYPE_CHECKING imports too)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in mods else base)
    return {m for m in out if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_models_import_nothing_from_the_data_layer():
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.startswith("mmer_dist.data"))
           for m, deps in graph.items() if m.startswith("mmer_dist.models")}
    assert not {m: d for m, d in bad.items() if d}


def test_only_dist_touches_torch_distributed():
    offenders = []
    for name, path in _modules().items():
        if name == "mmer_dist.dist":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
                offenders.append(name)
            elif isinstance(node, ast.ImportFrom) and (
                    (node.module or "").startswith("torch.distributed")
                    or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
                offenders.append(name)
            elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                offenders.append(name)
    assert not offenders


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_short_and_documented(name):
    path = _modules()[name]
    text = path.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(text)), f"{path} has no module docstring"
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path} has {lines} lines (> {MAX_LINES}): split it by concern"


LAYERS = {
    # package or module -> what it may import besides itself (docs/architecture.md, "Who imports whom")
    "mmer_dist.weighting": set(),
    "mmer_dist.folds": set(),
    "mmer_dist.dist": set(),
    "mmer_dist.plots": set(),
    "mmer_dist.lifecycle": set(),
    "mmer_dist.jsonio": set(),
    "mmer_dist.config": {"mmer_dist.weighting"},
    "mmer_dist.presets": {"mmer_dist.config", "mmer_dist.jsonio"},
    "mmer_dist.corpora": {"mmer_dist.folds", "mmer_dist.jsonio"},
    "mmer_dist.shards": {"mmer_dist.corpora", "mmer_dist.plots", "mmer_dist.jsonio"},
    "mmer_dist.data": {"mmer_dist.config", "mmer_dist.weighting", "mmer_dist.folds", "mmer_dist.dist",
                       "mmer_dist.shards.schema", "mmer_dist.shards.location", "mmer_dist.jsonio"},
    "mmer_dist.models": {"mmer_dist.config", "mmer_dist.weighting", "mmer_dist.jsonio"},
    "mmer_dist.train": {"mmer_dist.config", "mmer_dist.presets", "mmer_dist.weighting", "mmer_dist.dist",
                        "mmer_dist.lifecycle", "mmer_dist.folds", "mmer_dist.data", "mmer_dist.models",
                        "mmer_dist.shards.schema", "mmer_dist.jsonio"},
    "mmer_dist.experiments.stats": set(),
    "mmer_dist.experiments": {"mmer_dist.experiments.stats", "mmer_dist.config", "mmer_dist.presets", "mmer_dist.plots",
                              "mmer_dist.report",
                              "mmer_dist.shards.schema", "mmer_dist.train.metrics", "mmer_dist.train.checkpoint"},
}


def _layer(module: str) -> str | None:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _allowed(dep: str, allowed: set[str]) -> bool:
    return any(dep == a or dep.startswith(a + ".") for a in allowed)


def test_every_layer_imports_only_what_the_architecture_page_allows():
    bad = []
    for module, deps in _graph().items():
        layer = _layer(module)
        if layer is None:          # entry points (cli, demo, evaluate, predict, embed, report) may import anything
            continue
        bad += [f"{module} -> {d}" for d in sorted(deps)
                if _layer(d) != layer and not _allowed(d, LAYERS[layer])]
    assert not bad
