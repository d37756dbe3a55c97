"""Unit tests of the label sets and the joint 7-class map.

    .venv/bin/pytest tests/unit/test_labels.py -q
"""

from __future__ import annotations

import pytest

from mmer_dist.corpora.labels import (
    JOINT_LABELS, MELD_LABELS, RAVDESS_LABELS, RAVDESS_TO_JOINT, label_id, labels_for, to_joint,
)


def test_ids_are_stable() -> None:
    # Ids are written into shards: this order must never change.
    assert MELD_LABELS == ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
    assert RAVDESS_LABELS == ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
    assert JOINT_LABELS == MELD_LABELS
    assert [label_id(x, MELD_LABELS) for x in MELD_LABELS] == list(range(7))
    assert label_id("surprised", RAVDESS_LABELS) == 7   # RAVDESS code 08 -> id 7
    assert labels_for("meld") is MELD_LABELS and labels_for("ravdess") is RAVDESS_LABELS
    assert labels_for("joint") is JOINT_LABELS


def test_joint_map_covers_every_ravdess_label() -> None:
    assert set(RAVDESS_TO_JOINT) == set(RAVDESS_LABELS)
    assert set(RAVDESS_TO_JOINT.values()) == set(JOINT_LABELS)     # every joint class is reachable
    assert to_joint("ravdess", "calm") == "neutral"
    assert to_joint("ravdess", "happy") == "joy"
    assert to_joint("ravdess", "surprised") == "surprise"
    assert to_joint("ravdess", "fearful") == "fear"
    for label in RAVDESS_LABELS:
        assert to_joint("ravdess", label) in JOINT_LABELS
    for label in MELD_LABELS:
        assert to_joint("meld", label) == label


def test_label_errors_list_choices() -> None:
    with pytest.raises(ValueError, match="unknown emotion 'contempt'; expected one of neutral, joy"):
        label_id("contempt", MELD_LABELS)
    with pytest.raises(ValueError, match="unknown RAVDESS emotion 'joy'"):
        to_joint("ravdess", "joy")
    with pytest.raises(ValueError, match="unknown emotion 'calm'"):
        to_joint("meld", "calm")
    with pytest.raises(ValueError, match="unknown corpus 'iemocap'"):
        to_joint("iemocap", "neutral")
    with pytest.raises(ValueError, match="unknown label set 'iemocap'"):
        labels_for("iemocap")
