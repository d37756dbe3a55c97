"""RAVDESS reader: `Actor_XX/MM-VV-EE-II-SS-RR-AA.ext` files -> `Utterance` records, split by actor.

File name codes (Livingstone & Russo, 2018):

    MM modality       01 audio-video (mp4), 02 video-only (mp4), 03 audio-only (wav, flac, ...)
    VV vocal channel  01 speech, 02 song
    EE emotion        01..08 = neutral, calm, happy, sad, angry, fearful, disgust, surprised
    II intensity      01 normal, 02 strong
    SS statement      01 "Kids are talking by the door", 02 "Dogs are sitting by the door"
    RR repetition     01, 02
    AA actor          01..24 (odd = male, even = female)

Files that differ only in MM are one recording seen through different modalities; they are
paired into ONE utterance keyed `ravdess-VV-EE-II-SS-RR-AA`: `audio_path` is the audio-only file
when present, else the AV mp4 (its audio track); `video_path` is the AV mp4, else the video-only
mp4. An empty (zero-byte) audio-only file beside an AV mp4 counts as missing: the mp4's audio track is
used, and the utterance is counted as degraded ("empty_audio_file_used_av_audio"). A video-only recording without an audio-only partner has `audio_path=None` (its mp4 carries
only a silent track). The statement is the transcript (`text`).

Bad input: a root without `Actor_XX` folders is an error; a malformed name or a code out of
range raises `ValueError` naming the file (default, `strict=True`), or, with `strict=False`, is
counted in the report as "malformed_name" and skipped. Hidden files (`.*`, including macOS `._*`
resource forks) are ignored. Songs are excluded unless `vocal_channels` asks for them, and
counted as "song_excluded".

Splits are by actor only (speaker-independent); there is deliberately no random split. See
`split_actors` for the named folds.

    from mmer_dist.corpora.ravdess import read_ravdess
    utterances, report = read_ravdess("/data/ravdess", fold="default")
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmer_dist.corpora.labels import RAVDESS_LABELS
from mmer_dist.folds import FoldError, speaker_folds
from mmer_dist.corpora.record import ReadReport, Utterance

MODALITIES: dict[str, str] = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
VOCAL_CHANNELS: dict[str, str] = {"01": "speech", "02": "song"}
INTENSITIES: dict[str, str] = {"01": "normal", "02": "strong"}
STATEMENTS: dict[str, str] = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
REPETITIONS: tuple[str, ...] = ("01", "02")
ACTORS: range = range(1, 25)

AUDIO_EXTS: frozenset[str] = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac"})
VIDEO_EXTS: frozenset[str] = frozenset({".mp4"})

# Named folds; see split_actors. Kept in one place so the CLI help and the docs agree.
DEFAULT_TEST_ACTORS = 4
DEFAULT_DEV_ACTORS = 2
KFOLD_DEFAULT_K = 5

EMPTY_AUDIO_FALLBACK = "empty_audio_file_used_av_audio"
"""Degraded-reason: a zero-byte audio-only file replaced by the audio track of the recording's AV mp4."""

_NAME_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
_ACTOR_DIR_RE = re.compile(r"^Actor_(\d{2})$")
_FOLD_RE = re.compile(r"^fold(\d+)(?:of(\d+))?$")

_EXPECTED_NAME = ("MM-VV-EE-II-SS-RR-AA.ext with MM 01-03, VV 01-02, EE 01-08, II 01-02, SS 01-02, "
                  "RR 01-02, AA 01-24 (e.g. 03-01-05-02-01-01-12.wav)")


@dataclass(frozen=True)
class RavdessName:
    """The seven codes of one RAVDESS file name, validated."""

    modality: str       # "01" | "02" | "03"
    vocal_channel: str  # "01" | "02"
    emotion: str        # "01".."08"
    intensity: str      # "01" | "02"
    statement: str      # "01" | "02"
    repetition: str     # "01" | "02"
    actor: str          # "01".."24"

    @property
    def recording(self) -> tuple[str, str, str, str, str, str]:
        """The codes shared by all modalities of one recording (everything except MM)."""
        return (self.vocal_channel, self.emotion, self.intensity, self.statement, self.repetition, self.actor)

    @property
    def key(self) -> str:
        return "ravdess-" + "-".join(self.recording)

    @property
    def label(self) -> str:
        return RAVDESS_LABELS[int(self.emotion) - 1]

    @property
    def gender(self) -> str:
        return "male" if int(self.actor) % 2 == 1 else "female"


def parse_name(path: str | Path) -> RavdessName:
    """Parse and validate a RAVDESS file name; `ValueError` naming the file and the bad code.

    The extension must fit the modality: mp4 for 01/02, an audio extension for 03.
    """
    path = Path(path)
    m = _NAME_RE.match(path.stem)
    if m is None:
        raise ValueError(f"{path}: not a RAVDESS file name; expected {_EXPECTED_NAME}")
    name = RavdessName(*m.groups())
    checks = (
        ("modality", name.modality, tuple(MODALITIES)),
        ("vocal channel", name.vocal_channel, tuple(VOCAL_CHANNELS)),
        ("emotion", name.emotion, tuple(f"{i:02d}" for i in range(1, len(RAVDESS_LABELS) + 1))),
        ("intensity", name.intensity, tuple(INTENSITIES)),
        ("statement", name.statement, tuple(STATEMENTS)),
        ("repetition", name.repetition, REPETITIONS),
        ("actor", name.actor, tuple(f"{i:02d}" for i in ACTORS)),
    )
    for what, code, allowed in checks:
        if code not in allowed:
            raise ValueError(f"{path}: {what} code {code} out of range ({allowed[0]}..{allowed[-1]}); "
                             f"expected {_EXPECTED_NAME}")
    ext = path.suffix.lower()
    if name.modality == "03" and ext not in AUDIO_EXTS:
        raise ValueError(f"{path}: modality 03 (audio-only) needs an audio file ({', '.join(sorted(AUDIO_EXTS))}), "
                         f"got {path.suffix!r}")
    if name.modality in ("01", "02") and ext not in VIDEO_EXTS:
        raise ValueError(f"{path}: modality {name.modality} ({MODALITIES[name.modality]}) needs an .mp4, "
                         f"got {path.suffix!r}")
    return name


def _actor_ints(actors: Iterable[int | str] | str | None, what: str) -> list[int] | None:
    """Accept [21, 22], ["21", "22"] or "21,22"; validate 1..24."""
    if actors is None:
        return None
    items = [a for a in actors.split(",") if a.strip()] if isinstance(actors, str) else list(actors)
    out: list[int] = []
    for a in items:
        try:
            n = int(str(a).strip())
        except ValueError:
            raise ValueError(f"{what}: {a!r} is not an actor number (1..24)") from None
        if n not in ACTORS:
            raise ValueError(f"{what}: actor {n} out of range 1..24")
        out.append(n)
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: {out} lists an actor twice")
    return out


def split_actors(
    actors: Iterable[int],
    *,
    test_actors: Iterable[int | str] | str | None = None,
    dev_actors: Iterable[int | str] | str | None = None,
    fold: str | None = None,
) -> dict[int, str]:
    """Assign every actor present to "train", "dev" or "test" — by actor only, never at random.

    Either explicit lists or a named fold (not both). With neither, fold "default" is used.

    - Explicit lists: `test_actors` / `dev_actors` (ints, digit strings, or "21,22"). A list not
      given is empty; every listed actor must be present; an actor in both lists is an error.
      Lists may leave a split empty (e.g. `test_actors=[5]` on a one-actor root: all test).
    - "default": the last 4 actors present (sorted) are test, the 2 before them dev, the rest
      train (actors 01-24: test 21-24, dev 19-20; actors 01-20: test 17-20, dev 15-16). With
      fewer than 7 actors present: the last actor is test, the one before dev (needs >= 3).
    - "fold{k}" (k = 0..4) or "fold{k}of{K}": K-fold cross-validation over the sorted actors,
      cut into K contiguous near-equal groups; group k is test, the 2 actors before it
      (cyclically) are dev, the rest train. "fold4" over actors 01-20 equals "default".
    """
    present = sorted(set(int(a) for a in actors))
    if not present:
        raise ValueError("no actors to split")
    tests = _actor_ints(test_actors, "test_actors")
    devs = _actor_ints(dev_actors, "dev_actors")
    if fold is not None and (tests is not None or devs is not None):
        raise ValueError(f"give either fold={fold!r} or explicit test_actors/dev_actors, not both")

    if tests is not None or devs is not None:
        tests, devs = tests or [], devs or []
        both = sorted(set(tests) & set(devs))
        if both:
            raise ValueError(f"actor(s) {both} are in both test_actors and dev_actors; an actor belongs to one split")
        absent = sorted((set(tests) | set(devs)) - set(present))
        if absent:
            raise ValueError(f"actor(s) {absent} listed for test/dev have no files; actors present: {present}")
    else:
        name = fold or "default"
        n = len(present)
        if name == "default":
            if n >= DEFAULT_TEST_ACTORS + DEFAULT_DEV_ACTORS + 1:
                n_test, n_dev = DEFAULT_TEST_ACTORS, DEFAULT_DEV_ACTORS
            elif n >= 3:
                n_test, n_dev = 1, 1
            else:
                raise ValueError(f"fold 'default' needs at least 3 actors (train, dev, test); present: {present}. "
                                 f"Give test_actors/dev_actors explicitly")
            tests = present[n - n_test:]
            devs = present[n - n_test - n_dev:n - n_test]
        else:
            m = _FOLD_RE.match(name)
            if m is None:
                raise ValueError(f"unknown fold {name!r}; expected 'default', 'fold0'..'fold{KFOLD_DEFAULT_K - 1}' "
                                 f"or 'fold{{k}}of{{K}}' (there is no random split: speakers must not leak)")
            k = int(m.group(1))
            kk = int(m.group(2)) if m.group(2) else KFOLD_DEFAULT_K
            if not 0 <= k < kk:
                raise ValueError(f"fold {name!r}: fold index {k} must be in 0..{kk - 1}")
            try:          # the same rule as training-time folds (data.folds), mmer_dist.folds
                chosen = speaker_folds(present, kk, k, DEFAULT_DEV_ACTORS)
            except FoldError:
                raise ValueError(f"fold {name!r} needs more actors: {n} present ({present}) for {kk} folds "
                                 f"plus {DEFAULT_DEV_ACTORS} dev actors and a training actor") from None
            tests, devs = chosen["test"], chosen["dev"]
    split = {a: "train" for a in present}
    split.update({a: "dev" for a in devs})
    split.update({a: "test" for a in tests})
    return split


def _actor_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"RAVDESS root {root} is not a folder; pass the folder holding Actor_01, Actor_02, ...")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and _ACTOR_DIR_RE.match(p.name))
    if not dirs:
        raise ValueError(f"{root} is not a RAVDESS root: it has no Actor_XX folders "
                         f"(expected e.g. {root}/Actor_01/03-01-01-01-01-01-01.wav)")
    return dirs


def _audio_source(files: dict[str, Path], report: ReadReport) -> Path | None:
    """The audio-only file, else the AV mp4's audio track; an empty audio-only file beside a non-empty AV mp4
    falls back like a missing one."""
    wav, av_mp4 = files.get("03"), files.get("01")
    if wav is not None and av_mp4 is not None and wav.stat().st_size == 0 and av_mp4.stat().st_size > 0:
        report.add(EMPTY_AUDIO_FALLBACK, f"{wav}: 0 bytes; audio taken from {av_mp4.name}", dropped=False)
        return av_mp4
    return wav or av_mp4


def read_ravdess(
    root: str | Path,
    *,
    test_actors: Iterable[int | str] | str | None = None,
    dev_actors: Iterable[int | str] | str | None = None,
    fold: str | None = None,
    vocal_channels: Iterable[str] = ("speech",),
    strict: bool = True,
    split: str = "actors",
) -> tuple[list[Utterance], ReadReport]:
    """Read a RAVDESS root (`Actor_XX/` folders), pair modalities, split by actor.

    Args:
        root: folder holding `Actor_XX/` folders (any subset of actors 01-24).
        test_actors, dev_actors, fold: the actor split, see `split_actors` (default fold "default",
            computed over the actors that have at least one kept recording).
        vocal_channels: "speech" and/or "song"; recordings of other channels are counted in the
            report as "song_excluded" (or "speech_excluded").
        strict: malformed names raise (True, default) or are counted as "malformed_name" (False).
        split: "actors" (default: train/dev/test by actor, as above) or "none": every recording in one
            split "all" with its actor kept, for folds chosen at training time (`data.folds`).

    Returns:
        (utterances sorted by actor then codes, report).
    """
    root = Path(root)
    channels = tuple(vocal_channels)
    for c in channels:
        if c not in VOCAL_CHANNELS.values():
            raise ValueError(f"vocal_channels item {c!r}; expected 'speech' and/or 'song'")
    if not channels:
        raise ValueError("vocal_channels is empty; use ('speech',), ('song',) or ('speech', 'song')")

    report = ReadReport()
    recordings: dict[tuple[str, ...], dict[str, Path]] = {}
    names: dict[tuple[str, ...], RavdessName] = {}
    for actor_dir in _actor_dirs(root):
        folder_actor = _ACTOR_DIR_RE.match(actor_dir.name).group(1)  # type: ignore[union-attr]
        for path in sorted(actor_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue  # hidden files: .DS_Store, macOS ._* resource forks
            try:
                name = parse_name(path)
                if name.actor != folder_actor:
                    raise ValueError(f"{path}: actor code {name.actor} does not match its folder {actor_dir.name}; "
                                     f"move the file to Actor_{name.actor}/")
            except ValueError as err:
                if strict:
                    raise
                report.add("malformed_name", str(err), dropped=True)
                continue
            slot = recordings.setdefault(name.recording, {})
            if name.modality in slot:
                raise ValueError(f"two files for the same recording and modality: {slot[name.modality]} and {path}; "
                                 f"keep one of them")
            slot[name.modality] = path
            names[name.recording] = name

    kept: list[RavdessName] = []
    for rec in sorted(recordings, key=lambda r: (r[5], r)):
        name = names[rec]
        channel = VOCAL_CHANNELS[name.vocal_channel]
        if channel not in channels:
            report.add(f"{channel}_excluded", name.key, dropped=True)
            continue
        kept.append(name)
    if not kept:
        raise ValueError(f"{root}: no {'/'.join(channels)} recordings found under its Actor_XX folders")

    if split not in ("actors", "none"):
        raise ValueError(f"split={split!r}; expected 'actors' (train/dev/test by actor) or 'none' (one split 'all')")
    if split == "none" and (test_actors or dev_actors or fold):
        raise ValueError("--split none keeps every actor in one split 'all' (choose folds when training: "
                         "data.folds=K data.fold=k); it takes no --test-actors/--dev-actors/--fold")
    actors = sorted({int(n.actor) for n in kept})
    assignment = ({a: "all" for a in actors} if split == "none" else
                  split_actors(actors, test_actors=test_actors, dev_actors=dev_actors, fold=fold))
    utterances: list[Utterance] = []
    for name in kept:
        files = recordings[name.recording]
        audio = _audio_source(files, report)
        video = files.get("01") or files.get("02")
        utterances.append(Utterance(
            key=name.key,
            corpus="ravdess",
            split=assignment[int(name.actor)],
            label=name.label,
            label_id=int(name.emotion) - 1,
            speaker=f"Actor_{name.actor}",
            text=STATEMENTS[name.statement],
            audio_path=audio,
            video_path=video,
            meta={
                "modality": "+".join(sorted(files)),
                "vocal_channel": VOCAL_CHANNELS[name.vocal_channel],
                "emotion_code": name.emotion,
                "intensity": INTENSITIES[name.intensity],
                "statement": name.statement,
                "repetition": int(name.repetition),
                "actor": int(name.actor),
                "gender": name.gender,
                "files": [files[m].name for m in sorted(files)],
            },
        ))
    return utterances, report
