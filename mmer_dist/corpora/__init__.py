"""Corpus readers: each turns a raw corpus on disk into `Utterance` records.

    from mmer_dist.corpora import read_corpus
    utterances, report = read_corpus("meld", root)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmer_dist.corpora.record import ReadReport, Utterance

CORPORA: tuple[str, ...] = ("meld", "ravdess")


def read_corpus(corpus: str, root: str | Path, **options: Any) -> tuple[list[Utterance], ReadReport]:
    """Read a raw corpus folder with the reader of `corpus` ("meld" or "ravdess").

    `options` go to the reader: `mmer_dist.corpora.meld.read_meld` (splits, missing_media) or
    `mmer_dist.corpora.ravdess.read_ravdess` (test_actors, dev_actors, fold, vocal_channels, strict).
    A synthetic corpus is written in one of these raw layouts and read the same way.
    """
    if corpus == "meld":
        from mmer_dist.corpora.meld import read_meld

        return read_meld(root, **options)
    if corpus == "ravdess":
        from mmer_dist.corpora.ravdess import read_ravdess

        return read_ravdess(root, **options)
    raise ValueError(f"unknown corpus {corpus!r}; expected one of {', '.join(CORPORA)}")


__all__ = ["CORPORA", "ReadReport", "Utterance", "read_corpus"]
