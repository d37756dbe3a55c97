"""Speaker-independent folds: which speakers are test, dev and train in fold k of K.

    speaker_folds(["Actor_01", ..., "Actor_20"], folds=5, fold=2, dev_speakers=2)
    # {"test": ["Actor_09", ..., "Actor_12"], "dev": ["Actor_07", "Actor_08"], "train": [the other 14]}

The sorted speakers are cut into K contiguous, near-equal groups (earlier groups take the remainder;
20 actors -> 5 folds of 4, as in EmoBox); group k is test, the `dev_speakers` speakers just before it
(cyclically) are dev, the rest train. Dev is carved from the training speakers, never from the test
speakers and never by a random utterance split. One rule for both places folds are cut: at pack time
(`mmer-dist pack ravdess --fold fold{k}of{K}`, mmer_dist.corpora.ravdess) and at training time
(`data.folds=K data.fold=k`, mmer_dist.data.folds), so the two give the same speaker sets.
"""

from __future__ import annotations


class FoldError(ValueError):
    """A fold configuration that cannot hold: the message says what to change."""


def contiguous_groups(items: list, k: int) -> list[list]:
    """`items` (sorted) cut into k contiguous, near-equal groups; earlier groups take the remainder."""
    size, extra = divmod(len(items), k)
    groups, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        groups.append(items[start:end])
        start = end
    return groups


def speaker_folds(speakers: list, folds: int, fold: int, dev_speakers: int) -> dict[str, list]:
    """{"train", "dev", "test"} speaker lists of fold `fold` of `folds` over `speakers` (see the module docstring)."""
    present = sorted(set(speakers))
    n = len(present)
    if not 0 <= fold < folds:
        raise FoldError(f"data.fold={fold} must be in 0..{folds - 1} (data.folds={folds})")
    if folds < 2 or folds > n:
        raise FoldError(f"data.folds={folds}: {n} speakers can make 2..{n} speaker-independent folds")
    test = contiguous_groups(present, folds)[fold]
    if n - len(test) < dev_speakers + 1:
        raise FoldError(f"fold {fold} of {folds} holds {len(test)} of {n} speakers out for test, which leaves "
                        f"{n - len(test)}: too few for data.dev_speakers={dev_speakers} and a training speaker; "
                        f"use fewer folds or fewer dev speakers")
    start = present.index(test[0])
    dev = [present[(start - i) % n] for i in range(dev_speakers, 0, -1)]
    train = [s for s in present if s not in test and s not in dev]
    return {"train": train, "dev": dev, "test": test}
