"""The one record type every corpus reader produces, and the report of what it skipped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Utterance:
    """One labelled utterance of a raw corpus, before packing.

    A modality the utterance lacks is `None` (text "" counts as absent only for corpora
    without transcripts). `key` is unique within a corpus and safe as a WebDataset key
    (no dots, no slashes).
    """

    key: str                      # e.g. "meld-train-dia12_utt3", "ravdess-01-03-01-01-02-05" (VV-EE-II-SS-RR-AA)
    corpus: str                   # "meld" | "ravdess" | ...
    split: str                    # "train" | "dev" | "test"
    label: str                    # corpus-native emotion name
    label_id: int                 # index of `label` in the corpus label set (corpora.labels)
    speaker: str
    text: str | None = None       # transcript (clean UTF-8), None when the corpus has none
    audio_path: Path | None = None
    video_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)   # corpus-specific fields (ids, times, ...)

    @property
    def group(self) -> int:
        """The id of the corpus's independent unit this utterance belongs to (`group_of`)."""
        return group_of(self.corpus, self.meta)


GROUP_UNITS = {"meld": "dialogue", "ravdess": "speaker"}
"""What a sample's group is per corpus; statistics resample whole groups (other corpora: "utterance")."""
_GROUP_FIELDS = {"meld": "dialogue_id", "ravdess": "actor"}


def group_of(corpus: str, meta: dict[str, Any]) -> int:
    """The MELD dialogue id or the RAVDESS actor of an utterance's corpus fields; -1 where each utterance is
    its own unit."""
    name = _GROUP_FIELDS.get(corpus)
    return int(meta[name]) if name and name in meta else -1


@dataclass
class ReadReport:
    """What a reader skipped or degraded, counted by reason, with examples to show the user."""

    skipped: Counter = field(default_factory=Counter)      # reason -> count of dropped utterances
    degraded: Counter = field(default_factory=Counter)     # reason -> count kept with a modality missing
    examples: dict[str, list[str]] = field(default_factory=dict)   # reason -> first few file/row names

    def add(self, reason: str, where: str, *, dropped: bool) -> None:
        (self.skipped if dropped else self.degraded)[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), "degraded": dict(self.degraded), "examples": self.examples}
