"""Label sets of each corpus, and the optional joint 7-class map for training on both.

MELD uses Ekman's six basic emotions plus neutral; RAVDESS adds calm and spells some
names differently. `JOINT_LABELS` is MELD's set; `to_joint` maps a RAVDESS label onto it
(calm -> neutral, happy -> joy, ...), so one model can be trained on both corpora.
"""

from __future__ import annotations

# Order is the label id; never reorder (ids are written into shards).
MELD_LABELS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")

# RAVDESS emotion codes 01..08, in code order.
RAVDESS_LABELS: tuple[str, ...] = (
    "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised",
)

JOINT_LABELS: tuple[str, ...] = MELD_LABELS

RAVDESS_TO_JOINT: dict[str, str] = {
    "neutral": "neutral",
    "calm": "neutral",
    "happy": "joy",
    "sad": "sadness",
    "angry": "anger",
    "fearful": "fear",
    "disgust": "disgust",
    "surprised": "surprise",
}

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "meld": MELD_LABELS,
    "ravdess": RAVDESS_LABELS,
    "joint": JOINT_LABELS,
}


def labels_for(name: str) -> tuple[str, ...]:
    """The label tuple of a corpus (`meld`, `ravdess`) or of the `joint` map."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; expected one of {sorted(LABEL_SETS)}") from None


def label_id(label: str, labels: tuple[str, ...]) -> int:
    """Id of `label` in `labels`, with an error that lists the valid names."""
    try:
        return labels.index(label)
    except ValueError:
        raise ValueError(f"unknown emotion {label!r}; expected one of {', '.join(labels)}") from None


def to_joint(corpus: str, label: str) -> str:
    """Map a corpus-native label onto the joint 7-class set."""
    if corpus == "meld":
        label_id(label, MELD_LABELS)
        return label
    if corpus == "ravdess":
        if label not in RAVDESS_TO_JOINT:
            raise ValueError(f"unknown RAVDESS emotion {label!r}; expected one of {', '.join(RAVDESS_LABELS)}")
        return RAVDESS_TO_JOINT[label]
    raise ValueError(f"unknown corpus {corpus!r}; expected 'meld' or 'ravdess'")
