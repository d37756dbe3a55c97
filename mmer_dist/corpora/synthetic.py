"""Synthetic MELD- and RAVDESS-layout corpora: small, learnable in every modality, byte-deterministic.

    mmer-dist synth meld --out /tmp/raw-meld --n 600 --seed 0
    mmer-dist synth ravdess --out /tmp/raw-ravdess

    from mmer_dist.corpora.synthetic import write_corpus, write_meld, write_ravdess
    print(write_meld("/tmp/raw", n=300, seed=1, noise=0.1, proportions={"neutral": 0.5, ...}))

The files are the real formats, written with PyAV (its bundled FFmpeg; no system ffmpeg):

- MELD layout: `train_sent_emo.csv`, `dev_sent_emo.csv`, `test_sent_emo.csv` with the official
  header (CRLF rows, times like "00:16:16,059", UTF-8 with a few U+2019 apostrophes like the
  real CSVs), and `train_splits/`, `dev_splits_complete/`, `output_repeated_splits_test/`
  holding `dia{D}_utt{U}.mp4`: H.264 video (yuv420p) + AAC mono audio. With `video=False` the
  clips are audio-only mp4s (same names); with `clips=False` only the CSVs are written.
- RAVDESS layout: `Actor_XX/03-01-EE-II-SS-RR-AA.wav` (16-bit PCM mono, 48 kHz by default) and,
  for the same utterance, `Actor_XX/01-01-EE-II-SS-RR-AA.mp4` (H.264 + AAC, the same audio).
  Every actor has the full RAVDESS speech design by default: 8 emotions x 2 statements x
  2 repetitions, x 2 intensities except neutral (60 utterances). Odd actors are male.

How the emotion shows up in each modality (voice, face, words), the per-sample randomness and
the `noise` knob (share of ambiguous cues per modality) are described in
mmer_dist/corpora/synthetic_media.py, which renders the media; this module plans the corpora
(classes, splits, speakers, dialogues, actors) and writes their files in the datasets' layouts.

Determinism: the plan (labels, splits, speakers, dialogues) comes from `seed`; every sample's
media comes from its own generator seeded with (seed, corpus, index), so the same seed gives
identical bytes. Encoders run single-threaded (x264 `threads=1`), muxers and codecs get
`bitexact` and no creation time is written. Output is identical for the same PyAV/FFmpeg
build; a different FFmpeg build may encode differently.
"""

from __future__ import annotations

import argparse

import csv
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from mmer_dist.corpora.labels import MELD_LABELS, RAVDESS_LABELS
from mmer_dist.corpora.synthetic_media import draw_take, render_audio, render_frames, synth_text, write_mp4, write_wav

# --------------------------------------------------------------------------- layout constants

MELD_HEADER: tuple[str, ...] = (
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
    "Season", "Episode", "StartTime", "EndTime",
)
MELD_CSV: dict[str, str] = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
MELD_CLIP_DIR: dict[str, str] = {
    "train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test",
}
# MELD's class shares (train split of the real corpus, rounded).
MELD_PROPORTIONS: dict[str, float] = {
    "neutral": 0.47, "joy": 0.17, "surprise": 0.12, "anger": 0.11, "sadness": 0.07, "disgust": 0.03, "fear": 0.03,
}
MELD_SENTIMENT: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral",), "joy": ("positive",), "surprise": ("positive", "negative"),
    "anger": ("negative",), "sadness": ("negative",), "disgust": ("negative",), "fear": ("negative",),
}
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "dev": 0.1, "test": 0.2}
DEFAULT_MELD_N = 600
DEFAULT_RAVDESS_ACTORS = 12
MELD_MIN_PER_SPLIT = 3
RAVDESS_DESIGN_SIZE = 60         # speech utterances per actor: 8 emotions x 2 statements x 2 repetitions x
                                 # 2 intensities, neutral without the strong one
RAVDESS_STATEMENTS = ("Kids are talking by the door", "Dogs are sitting by the door")

# Speakers: name -> (base f0 in Hz, skin RGB, hair RGB)
MELD_SPEAKERS: dict[str, tuple[float, tuple[int, int, int], tuple[int, int, int]]] = {
    "Ross": (112.0, (224, 180, 150), (70, 45, 30)),
    "Joey": (104.0, (214, 165, 130), (30, 25, 20)),
    "Chandler": (121.0, (230, 190, 160), (95, 65, 40)),
    "Rachel": (215.0, (236, 196, 170), (150, 105, 60)),
    "Monica": (198.0, (232, 188, 160), (40, 30, 25)),
    "Phoebe": (228.0, (240, 205, 180), (220, 190, 120)),
    "Gunther": (128.0, (238, 206, 185), (235, 235, 225)),
    "Janice": (206.0, (226, 178, 150), (25, 20, 20)),
    "The Interviewer": (98.0, (180, 130, 100), (50, 50, 50)),
}
MELD_SPEAKER_WEIGHTS = np.array([0.16, 0.15, 0.15, 0.16, 0.15, 0.14, 0.03, 0.03, 0.03])


# --------------------------------------------------------------------------- corpus plans


def _prepare_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; pass --out a new or empty folder")
        if any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty; synthetic corpora are written only into a new or empty "
                                  f"folder (delete it or choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def min_n(corpus: str, *, min_per_split: int = MELD_MIN_PER_SPLIT, n_actors: int = DEFAULT_RAVDESS_ACTORS) -> int:
    """The smallest `n` whose corpus has every class in every split: MELD, each of the 7 classes
    `min_per_split` times in each of the 3 splits (63); RAVDESS, splits are by actor, so every actor needs
    every one of the 8 emotions (the design lists them first): 8 per actor (96 with 12 actors)."""
    if corpus == "meld":
        return len(MELD_LABELS) * 3 * min_per_split
    return len(RAVDESS_LABELS) * n_actors


def check_n(corpus: str, n: int, *, what: str = "n", min_per_split: int = MELD_MIN_PER_SPLIT,
            n_actors: int = DEFAULT_RAVDESS_ACTORS) -> None:
    """ValueError naming `what` (n, or --n on the command line) when `n` cannot give every class in every split."""
    low = min_n(corpus, min_per_split=min_per_split, n_actors=n_actors)
    given = f"{what} {n}" if what.startswith("--") else f"{what}={n}"
    high = RAVDESS_DESIGN_SIZE * n_actors if corpus == "ravdess" else None
    if n < low:
        why = (f"each of the {len(MELD_LABELS)} classes needs {min_per_split} utterances in each of the 3 splits"
               if corpus == "meld" else
               f"splits are by actor, so each of the {n_actors} actors needs all {len(RAVDESS_LABELS)} emotions")
        raise ValueError(f"{given} is too small for a synthetic {corpus} corpus: {why}; use {what} >= {low}")
    if high is not None and n > high:
        raise ValueError(f"{given} is too large for a synthetic ravdess corpus: {n_actors} actors x "
                         f"{RAVDESS_DESIGN_SIZE} speech utterances = {high}; use {what} <= {high}")


def _class_counts(n: int, proportions: dict[str, float], labels: Sequence[str], minimum: int) -> dict[str, int]:
    """Largest-remainder apportionment of n over the classes, each class at least `minimum`."""
    unknown = set(proportions) - set(labels)
    if unknown:
        raise ValueError(f"proportions name unknown classes {sorted(unknown)}; expected some of {list(labels)}")
    p = np.array([max(0.0, float(proportions.get(c, 0.0))) for c in labels])
    if p.sum() <= 0:
        raise ValueError("proportions must have a positive total")
    if (p == 0).any():
        missing = [c for c, x in zip(labels, p) if x == 0]
        raise ValueError(f"proportions give classes {missing} no share; every class must be present in every split")
    if n < minimum * len(labels):
        raise ValueError(f"n={n} is too small: each of the {len(labels)} classes needs at least {minimum} "
                         f"utterances (min_per_split x 3 splits); use n >= {minimum * len(labels)}")
    p = p / p.sum()
    raw = p * n
    counts = np.maximum(np.floor(raw).astype(int), minimum)
    while counts.sum() > n:  # take back from the largest classes above the minimum
        i = int(np.argmax(np.where(counts > minimum, counts - raw, -np.inf)))
        counts[i] -= 1
    while counts.sum() < n:
        counts[int(np.argmax(raw - counts))] += 1
    return {c: int(k) for c, k in zip(labels, counts)}


def _split_counts(count: int, fractions: dict[str, float], minimum: int) -> dict[str, int]:
    """Split one class's count over train/dev/test, each split at least `minimum`."""
    dev = max(minimum, int(round(count * fractions["dev"])))
    test = max(minimum, int(round(count * fractions["test"])))
    return {"train": count - dev - test, "dev": dev, "test": test}


def _fmt_time(ms: int) -> str:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _sample_rng(seed: int, corpus_code: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), corpus_code, index])


def _check_common(noise: float, seconds: tuple[float, float], frame_size: int, fps: float, sample_rate: int) -> None:
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise={noise} must be in [0, 1] (share of ambiguous cues per modality)")
    if not (0 < seconds[0] <= seconds[1]):
        raise ValueError(f"seconds={seconds} must be (min, max) with 0 < min <= max")
    if frame_size < 16 or frame_size % 2:
        raise ValueError(f"frame_size={frame_size} must be an even number >= 16 (H.264 yuv420p)")
    if fps <= 0 or sample_rate < 8000:
        raise ValueError(f"fps={fps} must be > 0 and sample_rate={sample_rate} >= 8000")


# --------------------------------------------------------------------------- MELD


def write_meld(
    out: str | Path,
    n: int | None = None,
    seed: int = 0,
    video: bool = True,
    *,
    clips: bool = True,
    proportions: dict[str, float] | None = None,
    split_fractions: dict[str, float] | None = None,
    min_per_split: int = MELD_MIN_PER_SPLIT,
    seconds: tuple[float, float] = (1.0, 2.0),
    frame_size: int = 64,
    fps: float = 10.0,
    sample_rate: int = 16000,
    noise: float = 0.15,
) -> str:
    """Write a synthetic corpus in MELD's raw layout into `out` (new or empty); returns a summary.

    n: utterances over all splits (default 600); proportions: class -> share (default MELD's);
    split_fractions: train/dev/test shares (default 0.7/0.1/0.2), every class at least
    `min_per_split` times in every split; video=False writes audio-only clips, clips=False none.
    """
    t0 = time.perf_counter()
    _check_common(noise, seconds, frame_size, fps, sample_rate)
    n = DEFAULT_MELD_N if n is None else int(n)
    check_n("meld", n, min_per_split=min_per_split)
    fractions = dict(SPLIT_FRACTIONS if split_fractions is None else split_fractions)
    if set(fractions) != set(SPLIT_FRACTIONS) or any(v < 0 for v in fractions.values()):
        raise ValueError(f"split_fractions={fractions} must give non-negative shares for train, dev and test")
    total = sum(fractions.values())
    fractions = {k: v / total for k, v in fractions.items()}
    counts = _class_counts(n, proportions or MELD_PROPORTIONS, MELD_LABELS, 3 * min_per_split)
    out = _prepare_out(out)
    plan = np.random.default_rng([int(seed), 1])

    per_split: dict[str, list[str]] = {s: [] for s in SPLIT_FRACTIONS}
    for label in MELD_LABELS:
        for split, k in _split_counts(counts[label], fractions, min_per_split).items():
            per_split[split] += [label] * k
    speakers = list(MELD_SPEAKERS)
    weights = MELD_SPEAKER_WEIGHTS / MELD_SPEAKER_WEIGHTS.sum()
    index = 0
    n_clips = 0
    bar = tqdm(total=sum(len(v) for v in per_split.values()), desc="synth meld", unit="utt", mininterval=1.0)
    for split in ("train", "dev", "test"):
        labels = per_split[split]
        order = plan.permutation(len(labels))
        rows: list[list[str]] = []
        clip_dir = out / MELD_CLIP_DIR[split]
        if clips:
            clip_dir.mkdir()
        dialogue, pos = 0, 0
        while pos < len(order):
            size = int(plan.integers(1, 9))
            season, episode = int(plan.integers(1, 11)), int(plan.integers(1, 25))
            clock = int(plan.integers(0, 20 * 60_000))
            cast = list(plan.choice(len(speakers), size=2, replace=False, p=weights))
            for utt, j in enumerate(order[pos:pos + size]):
                label = labels[int(j)]
                speaker = speakers[int(cast[int(plan.integers(2))])]
                rng = _sample_rng(seed, 1, index)
                index += 1
                duration = float(rng.uniform(*seconds))
                base_f0, skin, hair = MELD_SPEAKERS[speaker]
                take = draw_take(label, rng, labels=MELD_LABELS, f0=base_f0, skin=skin, hair=hair, noise=noise)
                text = synth_text(label, rng, ambiguous=bool(rng.random() < noise))
                sentiment = MELD_SENTIMENT[label][int(rng.integers(len(MELD_SENTIMENT[label])))]
                start = clock + int(rng.integers(0, 1500))
                end = start + int(round(duration * 1000))
                clock = end
                rows.append([str(len(rows) + 1), text, speaker, label, sentiment, str(dialogue), str(utt),
                             str(season), str(episode), _fmt_time(start), _fmt_time(end)])
                if clips:
                    audio = render_audio(take, sample_rate, duration, rng)
                    frames = render_frames(take, max(1, int(round(duration * fps))), frame_size, fps, rng) if video else None
                    write_mp4(clip_dir / f"dia{dialogue}_utt{utt}.mp4", frames, fps, audio, sample_rate)
                    n_clips += 1
                bar.update(1)
            pos += size
            dialogue += 1
        with open(out / MELD_CSV[split], "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\r\n")
            writer.writerow(MELD_HEADER)
            writer.writerows(rows)
    bar.close()
    elapsed = time.perf_counter() - t0
    split_sizes = ", ".join(f"{s} {len(per_split[s])}" for s in per_split)
    classes = ", ".join(f"{c} {counts[c]}" for c in MELD_LABELS)
    media = ("no clips (CSVs only)" if not clips else
             f"{n_clips} clips ({'H.264 ' + str(frame_size) + 'px ' + format(fps, 'g') + ' fps + ' if video else 'audio-only, '}"
             f"AAC {sample_rate} Hz)")
    rate = f", {n_clips / elapsed:.1f} clips/s" if n_clips else ""
    return (f"wrote synthetic MELD corpus to {out}: {n} utterances ({split_sizes}); classes: {classes}; "
            f"{media}; noise={noise:g}, seed={seed}; {elapsed:.1f} s{rate}")


# --------------------------------------------------------------------------- RAVDESS


def ravdess_name(modality: int, emotion: int, intensity: int, statement: int, repetition: int, actor: int,
                 ext: str, vocal: int = 1) -> str:
    """RAVDESS file name MM-VV-EE-II-SS-RR-AA.ext."""
    return f"{modality:02d}-{vocal:02d}-{emotion:02d}-{intensity:02d}-{statement:02d}-{repetition:02d}-{actor:02d}.{ext}"


def ravdess_design() -> list[tuple[int, int, int, int]]:
    """The 60 speech utterances of one RAVDESS actor as (emotion, intensity, statement, repetition),
    ordered so that any prefix covers the emotions evenly."""
    design = [(e, i, s, r) for r in (1, 2) for s in (1, 2) for i in (1, 2) for e in range(1, 9) if not (e == 1 and i == 2)]
    return design


def write_ravdess(
    out: str | Path,
    n: int | None = None,
    seed: int = 0,
    video: bool = True,
    *,
    n_actors: int = DEFAULT_RAVDESS_ACTORS,
    seconds: tuple[float, float] = (1.0, 2.0),
    frame_size: int = 64,
    fps: float = 10.0,
    sample_rate: int = 48000,
    noise: float = 0.15,
) -> str:
    """Write a synthetic corpus in RAVDESS's raw layout into `out` (new or empty); returns a summary.

    Actors 01..n_actors (odd = male voice), each with the RAVDESS speech design (60 utterances;
    `n` spreads a total over the actors, rounded up to whole utterances per actor). Each utterance: the audio-only wav
    (03-...) and, with video=True, the AV mp4 (01-...) with the same audio. Intensity 02
    (strong) shows the emotion fully, 01 (normal) about half to three quarters.
    """
    t0 = time.perf_counter()
    _check_common(noise, seconds, frame_size, fps, sample_rate)
    if not 1 <= n_actors <= 24:
        raise ValueError(f"n_actors={n_actors} must be in 1..24 (RAVDESS has 24 actors)")
    design = ravdess_design()
    if n is not None:
        check_n("ravdess", int(n), n_actors=n_actors)
    per_actor = len(design) if n is None else math.ceil(int(n) / n_actors)
    out = _prepare_out(out)
    plan = np.random.default_rng([int(seed), 2])
    index = 0
    n_wav = n_mp4 = 0
    counts: dict[str, int] = {c: 0 for c in RAVDESS_LABELS}
    bar = tqdm(total=n_actors * per_actor, desc="synth ravdess", unit="utt", mininterval=1.0)
    for actor in range(1, n_actors + 1):
        folder = out / f"Actor_{actor:02d}"
        folder.mkdir()
        base_f0 = (110.0 if actor % 2 else 210.0) * float(plan.uniform(0.88, 1.12))
        skin = tuple(int(v) for v in plan.integers([170, 120, 90], [245, 210, 190]))
        hair = tuple(int(v) for v in plan.integers(10, 230, size=3))
        for emotion, intensity, statement, repetition in design[:per_actor]:
            label = RAVDESS_LABELS[emotion - 1]
            rng = _sample_rng(seed, 2, index)
            index += 1
            strength = float(rng.uniform(0.85, 1.0) if intensity == 2 else rng.uniform(0.5, 0.75))
            if label == "neutral":
                strength = 1.0
            take = draw_take(label, rng, labels=RAVDESS_LABELS, f0=base_f0, skin=skin, hair=hair,  # type: ignore[arg-type]
                             intensity=strength, noise=noise)
            duration = float(rng.uniform(*seconds))
            audio = render_audio(take, sample_rate, duration, rng)
            write_wav(folder / ravdess_name(3, emotion, intensity, statement, repetition, actor, "wav"), audio, sample_rate)
            n_wav += 1
            counts[label] += 1
            if video:
                frames = render_frames(take, max(1, int(round(duration * fps))), frame_size, fps, rng)
                write_mp4(folder / ravdess_name(1, emotion, intensity, statement, repetition, actor, "mp4"),
                          frames, fps, audio, sample_rate)
                n_mp4 += 1
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    classes = ", ".join(f"{c} {k}" for c, k in counts.items())
    return (f"wrote synthetic RAVDESS corpus to {out}: {n_actors} actors x {per_actor} utterances = {index}; "
            f"classes: {classes}; {n_wav} wavs ({sample_rate} Hz, 16-bit)"
            + (f", {n_mp4} AV mp4s (H.264 {frame_size}px {fps:g} fps + AAC)" if video else ", no video")
            + f"; noise={noise:g}, seed={seed}; {elapsed:.1f} s, {(n_wav + n_mp4) / max(elapsed, 1e-9):.1f} files/s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist synth",
                                description="Write a synthetic corpus in MELD's (CSV + dia{D}_utt{U}.mp4) or RAVDESS's "
                                   "(Actor_XX/MM-VV-EE-II-SS-RR-AA.{wav,mp4}) raw layout. Emotion shifts the "
                                   "voice, the drawn face and the words, so every modality is learnable.")
    p.add_argument("corpus", choices=["meld", "ravdess"])
    p.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    p.add_argument("--n", type=int, default=None,
                   help=f"utterances, enough for every class in every split. meld: the total over the splits, "
                        f">= {min_n('meld')} (7 classes x 3 splits x {MELD_MIN_PER_SPLIT}), default {DEFAULT_MELD_N}; "
                        f"ravdess: spread over {DEFAULT_RAVDESS_ACTORS} actors (rounded up per actor), "
                        f"{min_n('ravdess')} to {RAVDESS_DESIGN_SIZE * DEFAULT_RAVDESS_ACTORS} (8 emotions per actor; "
                        f"at most the {RAVDESS_DESIGN_SIZE} speech utterances of each), default all")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--no-video", action="store_true", help="skip the mp4 clips (text/audio only)")
    return p


# --------------------------------------------------------------------------- entry point


def write_corpus(corpus: str, out: str | Path, n: int | None = None, seed: int = 0, video: bool = True, **options: Any) -> str:
    """Write the synthetic `corpus` ("meld" or "ravdess") into `out`; options go to write_meld/write_ravdess."""
    if corpus == "meld":
        return write_meld(out, n=n, seed=seed, video=video, **options)
    if corpus == "ravdess":
        return write_ravdess(out, n=n, seed=seed, video=video, **options)
    raise ValueError(f"unknown corpus {corpus!r}; expected 'meld' or 'ravdess'")


def main(argv: list[str] | None = None) -> int:
    """`mmer-dist synth`: write the corpus, print its summary."""
    import sys

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n is not None:
            check_n(args.corpus, args.n, what="--n")
        print(write_corpus(args.corpus, args.out, n=args.n, seed=args.seed, video=not args.no_video))
    except (ValueError, FileExistsError) as e:
        print(f"mmer-dist synth: {e}", file=sys.stderr)
        return 2
    return 0
