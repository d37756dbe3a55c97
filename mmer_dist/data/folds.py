"""Splits chosen at training time: speaker-independent folds over a packed split, and the run's protocol.

    split, rows = fold_rows(index, root, cfg.data, "test")    # ("all", positions of the test speakers' samples)
    protocol(index, root, cfg.data)                           # what metrics.json records about the splits

With `data.folds=0` (the default) the splits are the ones packed (MELD's official splits, RAVDESS
actors chosen at pack time) and `fold_rows` returns the packed split whole. With `data.folds=K
data.fold=k` the samples of the packed split `data.fold_source` (e.g. a RAVDESS pack with `--split none`:
every actor in "all") are divided by speaker (mmer_dist.folds.speaker_folds): "test" is fold k's speakers,
"dev" the `data.dev_speakers` speakers before them, "train" the rest; the loaders then read only the rows
of those speakers. A speaker in two splits is refused for folds; for packed splits the overlap is
reported (MELD's official splits share speakers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmer_dist.config import DataConfig
from mmer_dist.folds import FoldError, speaker_folds
from mmer_dist.shards.schema import ShardIndex, split_index, split_samples

FOLD_SPLITS = ("train", "dev", "test")


def _speaker_ids(index: ShardIndex, root: Any, split: str) -> np.ndarray:
    split_index(index, split, root)                    # a missing split named with the shards folder
    return np.asarray(split_samples(index, split)["speaker"])


def fold_speakers(index: ShardIndex, root: str | Path, cfg: DataConfig) -> dict[str, list[str]]:
    """{"train", "dev", "test"} speaker names of the configured fold."""
    ids = np.unique(_speaker_ids(index, root, cfg.fold_source))
    if (ids < 0).any():
        raise FoldError(f"{root}: some samples of split {cfg.fold_source!r} have no speaker; speaker folds need "
                        f"every speaker (repack, or `mmer-dist reindex {root}` for a folder of an older version)")
    return speaker_folds([index.speakers[i] for i in ids], cfg.folds, cfg.fold, cfg.dev_speakers)


def fold_rows(index: ShardIndex, root: str | Path, cfg: DataConfig, split: str) -> tuple[str, np.ndarray | None]:
    """(the packed split to read, the positions in it of `split`'s samples; None = all of them)."""
    if cfg.folds == 0:
        return split, None
    if split not in FOLD_SPLITS:
        raise FoldError(f"with data.folds={cfg.folds} the splits are {', '.join(FOLD_SPLITS)} (cut by speaker from "
                        f"the packed split {cfg.fold_source!r}); got split {split!r}")
    chosen = fold_speakers(index, root, cfg)[split]
    ids = [index.speakers.index(name) for name in chosen]
    return cfg.fold_source, np.flatnonzero(np.isin(_speaker_ids(index, root, cfg.fold_source), ids))


def check_speaker_independence(speakers: dict[str, list[str]]) -> dict[str, int]:
    """Speakers shared by each pair of splits (as counts); FoldError when any are (folds must not leak)."""
    overlap = _overlap(speakers)
    if overlap:
        pair, n = next(iter(overlap.items()))
        raise FoldError(f"speaker-independent folds put {n} speaker(s) in both {pair.replace('&', ' and ')} "
                        f"(e.g. {sorted(set(speakers[pair.split('&')[0]]) & set(speakers[pair.split('&')[1]]))[:3]}); "
                        f"a speaker must be in one split only: check data.folds / data.dev_speakers / data.fold_source")
    return overlap


def _overlap(speakers: dict[str, list[str]]) -> dict[str, int]:
    names = sorted(speakers)
    return {f"{a}&{b}": n for i, a in enumerate(names) for b in names[i + 1:]
            if (n := len(set(speakers[a]) & set(speakers[b])))}


def protocol(index: ShardIndex, root: str | Path, cfg: DataConfig, splits: list[str]) -> dict[str, Any]:
    """The split protocol of a run: kind, speakers per split, their overlap (refused for folds)."""
    if cfg.folds:
        chosen = fold_speakers(index, root, cfg)
        speakers = {s: chosen[s] for s in splits}
        return {"split_kind": "speaker_folds", "folds": cfg.folds, "fold": cfg.fold, "source": cfg.fold_source,
                "speakers": speakers, "overlap": check_speaker_independence(speakers), "unit": index.group_unit}
    speakers = {s: sorted({index.speakers[i] for i in np.unique(_speaker_ids(index, root, s)) if i >= 0})
                for s in splits if s in index.splits}
    return {"split_kind": "packed", "speakers": {s: len(v) for s, v in speakers.items()},
            "overlap": _overlap(speakers), "unit": index.group_unit}
