"""`mmer-dist inspect SHARDS_DIR`: what a shards folder holds, from its index files only.

    mmer-dist inspect shards/out/meld                 # human summary
    mmer-dist inspect s3://bucket/meld                # the same through a URL (mmer_dist.shards.location)
    mmer-dist inspect shards/out/meld --json          # one JSON object for scripts
    mmer-dist inspect shards/out/meld --plots plots/  # per-split class-distribution PNGs

Reads `index.json`, `pack.json`, `skipped.json` (and, for a pack that has not been merged
yet, the per-shard `*.stats.json`, local folders only: nothing is listed behind a URL); it never
opens a tar (one stat or HEAD request per shard checks its size against the index: `damaged`), so
it is fast on any size.

JSON shape (`summarize`):
    {"path", "corpus", "profile", "complete", "labels",
     "splits": {"train": {"samples", "shards", "classes": {"neutral": n, ...},
                          "class_percent": {...}, "imbalance_ratio", "missing_classes",
                          "duration", "bytes", "modalities": {"text": n, ...}}, ...},
     "totals": {"samples", "shards", "duration", "bytes"},
     "skipped": {"dropped": {reason: n}, "degraded": {reason: n}, "total_dropped", "total_degraded"},
     "config": the pack arguments from pack.json (or {}),
     "damaged": ["path: N bytes, the index says M", ...] (merged folders)}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmer_dist.jsonio import damaged, read_json
from mmer_dist.shards.location import Location, ShardMissing
from mmer_dist.shards.schema import INDEX_FILE, PACK_FILE, SKIPPED_FILE, load_index, read_stats, size_mismatches

REPACK = "re-run the same `mmer-dist pack` command: finished shards are kept and the index files are merged again"


def _split_summary(classes: dict[str, int], labels: list[str], shards: int, duration: float, nbytes: int,
                   modalities: dict[str, int]) -> dict[str, Any]:
    classes = {k: int(classes.get(k, 0)) for k in labels} | {k: int(v) for k, v in classes.items() if k not in labels}
    n = sum(classes.values())
    present = [v for v in classes.values() if v > 0]
    return {
        "samples": n,
        "shards": shards,
        "classes": classes,
        "class_percent": {k: round(100.0 * v / n, 2) if n else 0.0 for k, v in classes.items()},
        "imbalance_ratio": round(max(present) / min(present), 3) if present else None,
        "missing_classes": [k for k, v in classes.items() if v == 0],
        "duration": round(float(duration), 3),
        "bytes": int(nbytes),
        "modalities": dict(modalities),
    }


def _from_stats(root: Path) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """Splits summarised from the per-shard stats of an unmerged (running or interrupted) pack."""
    acc: dict[str, dict[str, Any]] = {}
    dropped: dict[str, int] = {}
    degraded: dict[str, int] = {}
    for path in sorted(root.glob("*.stats.json")):
        st = read_stats(root, path.name[: -len(".stats.json")] + ".tar")
        a = acc.setdefault(st.split, {"classes": {}, "shards": 0, "duration": 0.0, "bytes": 0, "modalities": {}})
        a["shards"] += 1 if st.samples else 0
        a["duration"] += st.duration
        a["bytes"] += st.bytes
        for k, v in st.class_counts.items():
            a["classes"][k] = a["classes"].get(k, 0) + v
        for k, v in st.modalities.items():
            a["modalities"][k] = a["modalities"].get(k, 0) + v
        for s in st.skipped:
            d = dropped if s.get("dropped") else degraded
            d[s["reason"]] = d.get(s["reason"], 0) + 1
    skipped = {"dropped": dropped, "degraded": degraded, "total_dropped": sum(dropped.values()),
               "total_degraded": sum(degraded.values()), "note": "media failures of finished shards only"}
    return acc, [], skipped


def _optional_json(loc: Location, name: str, fix: str) -> Any:
    """A JSON object of the shards location, {} when it does not exist; a damaged one is named with `fix`."""
    if loc.is_local:
        path = loc.root / name
        return read_json(path, fix=fix) if path.exists() else {}
    try:
        raw = loc.read_bytes(name)
    except ShardMissing:
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise damaged(loc.shown(name), f"is not valid JSON ({e})", fix) from None
    if not isinstance(data, dict):
        raise damaged(loc.shown(name), f"holds {type(data).__name__} where an object / mapping was expected", fix)
    return data


def summarize(shards_dir: str | Path | Location) -> dict[str, Any]:
    """The summary of a shards folder or URL (see the module docstring for the shape)."""
    loc = shards_dir if isinstance(shards_dir, Location) else Location(shards_dir)
    if loc.is_local and not loc.root.is_dir():
        raise FileNotFoundError(f"{loc.root} is not a folder; pass a shards folder written by `mmer-dist pack`")
    pack_fix = f"it records the packing arguments: re-pack with `mmer-dist pack ... --out {loc} --overwrite`"
    config = _optional_json(loc, PACK_FILE, pack_fix).get("config", {})
    # nothing is listed behind a URL: without index.json it is no shards folder (load_index says so)
    out: dict[str, Any] = {"path": loc.shown(), "corpus": config.get("corpus"), "profile": config.get("profile"),
                           "complete": not loc.is_local or (loc.root / INDEX_FILE).exists(), "labels": [],
                           "splits": {}}
    if out["complete"]:
        index = load_index(loc)
        out.update(corpus=index.corpus, profile=index.profile, labels=list(index.labels))
        for name, si in index.splits.items():
            out["splits"][name] = _split_summary(si.class_counts, out["labels"], len(si.shards), si.duration,
                                                 si.bytes, si.modalities)
        out["damaged"] = size_mismatches(loc, index, list(index.splits))   # one stat/HEAD per shard, no read
        sk = _optional_json(loc, SKIPPED_FILE, REPACK)
        skipped = {k: sk.get(k, {} if not k.startswith("total") else 0)
                   for k in ("dropped", "degraded", "total_dropped", "total_degraded")}
    else:
        root = loc.root
        if not list(root.glob("*.stats.json")):
            raise FileNotFoundError(
                f"{root} has no {INDEX_FILE} and no *.stats.json: not a shards folder. "
                f"Create one with `mmer-dist pack {{meld,ravdess}} --root RAW --out {root}`")
        from mmer_dist.corpora.labels import labels_for

        acc, _, skipped = _from_stats(root)
        try:
            out["labels"] = list(labels_for(config.get("corpus", "")))
        except ValueError:
            out["labels"] = []
        for name, a in acc.items():
            out["splits"][name] = _split_summary(a["classes"], out["labels"], a["shards"], a["duration"],
                                                 a["bytes"], a["modalities"])
    splits = out["splits"].values()
    out["totals"] = {"samples": sum(s["samples"] for s in splits), "shards": sum(s["shards"] for s in splits),
                     "duration": round(sum(s["duration"] for s in splits), 3),
                     "bytes": sum(s["bytes"] for s in splits)}
    out["skipped"] = skipped
    out["config"] = config
    return out


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def format_summary(s: dict[str, Any]) -> str:
    """The human table printed by `mmer-dist inspect`."""
    lines = [f"{s['path']}: corpus {s['corpus']}, profile {s['profile']}"
             + ("" if s["complete"] else "  [INCOMPLETE: no index.json yet; figures from finished shards]")]
    splits = list(s["splits"])
    lines.append(f"{'split':<8}{'samples':>9}{'shards':>8}{'duration':>11}{'bytes':>11}  modalities")
    for name in splits:
        sp = s["splits"][name]
        mods = ", ".join(f"{m} {n} ({100 * n / sp['samples']:.0f}%)" for m, n in sp["modalities"].items()) \
            if sp["samples"] else "-"
        lines.append(f"{name:<8}{sp['samples']:>9}{sp['shards']:>8}{_hms(sp['duration']):>11}{_mb(sp['bytes']):>11}  {mods}")
    t = s["totals"]
    lines.append(f"{'total':<8}{t['samples']:>9}{t['shards']:>8}{_hms(t['duration']):>11}{_mb(t['bytes']):>11}")
    lines.append("")
    classes = list(dict.fromkeys(k for name in splits for k in s["splits"][name]["classes"]))
    lines.append(f"{'class':<12}" + "".join(f"{name:>18}" for name in splits))
    for c in classes:
        row = "".join(f"{s['splits'][n]['classes'].get(c, 0):>9} {s['splits'][n]['class_percent'].get(c, 0.0):>6.1f}% "
                      for n in splits)
        lines.append(f"{c:<12}{row}")
    ratios = "".join(f"{(str(s['splits'][n]['imbalance_ratio']) + 'x') if s['splits'][n]['imbalance_ratio'] else '-':>18}"
                     for n in splits)
    lines.append(f"{'imbalance':<12}{ratios}   (largest / smallest present class)")
    for n in splits:
        if s["splits"][n]["missing_classes"]:
            lines.append(f"  {n}: no samples of {', '.join(s['splits'][n]['missing_classes'])}")
    lines.append("")
    sk = s["skipped"]
    if not sk.get("total_dropped") and not sk.get("total_degraded"):
        lines.append("skipped inputs: none")
    else:
        for what, label in (("dropped", "inputs dropped"), ("degraded", "kept without a modality")):
            if sk.get(what):
                lines.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in sorted(sk[what].items())))
        lines.append(f"  (file names in {s['path'].rstrip('/')}/{SKIPPED_FILE})")
    if s.get("damaged"):
        lines.append(f"DAMAGED: {len(s['damaged'])} shard(s) differ from the index (first: {s['damaged'][0]}); "
                     f"`mmer-dist verify {s['path']}` names every one and the command that re-packs them")
    return "\n".join(lines)


def plot_classes(s: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One bar chart per split (`{split}_classes.png`): counts, %, imbalance ratio in the title."""
    from mmer_dist.plots import agg_figure, save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sp in s["splits"].items():
        labels = list(sp["classes"])
        counts = [sp["classes"][k] for k in labels]
        fig = agg_figure(max(5.0, 0.8 * len(labels) + 2), 3.6)
        ax = fig.add_subplot(1, 1, 1)
        bars = ax.bar(range(len(labels)), counts, color="#4c72b0")
        for b, k in zip(bars, labels):
            ax.annotate(f"{sp['classes'][k]}\n{sp['class_percent'][k]:.1f}%", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_ylabel("samples")
        ratio = f"{sp['imbalance_ratio']}x" if sp["imbalance_ratio"] else "-"
        ax.set_title(f"{s['corpus']} {name}: {sp['samples']} samples, imbalance {ratio}")
        ax.set_ylim(0, max(counts + [1]) * 1.25)
        path = out_dir / f"{name}_classes.png"
        save_png(fig, path)
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist inspect",
                                description="Summarise a shards folder from its index files only (never opens a tar): "
                                   "samples, classes and imbalance per split, modalities, skipped inputs by reason.")
    p.add_argument("shards", help="shards folder written by `mmer-dist pack` or `mmer-dist embed`, or its URL "
                                  "(s3://, gs://, http(s)://, file://, pipe:CMD with {shard})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the human summary")
    p.add_argument("--plots", default="", help="folder for per-split class-distribution PNGs (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`mmer-dist inspect`: print the summary (or JSON); optional plots."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        s = summarize(args.shards)
    except (OSError, ValueError, KeyError) as e:         # FileNotFoundError, ShardReadError are OSErrors
        print(f"mmer-dist inspect: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if getattr(args, "plots", ""):
        paths = plot_classes(s, args.plots)
        if not args.json:
            print("plots: " + ", ".join(str(p) for p in paths))
    print(json.dumps(s, indent=1, ensure_ascii=False) if args.json else format_summary(s))
    return 0
