"""MELD reader: the official CSVs (and, when present, the clip folders) -> `Utterance` records.

Layout of a MELD root (the official release, MELD.Raw):

    ROOT/train_sent_emo.csv   ROOT/train_splits/dia{D}_utt{U}.mp4
    ROOT/dev_sent_emo.csv     ROOT/dev_splits_complete/dia{D}_utt{U}.mp4
    ROOT/test_sent_emo.csv    ROOT/output_repeated_splits_test/dia{D}_utt{U}.mp4

Only the CSVs present are read (a root without any is an error). A split whose clip folder is
absent is read text-only, with nothing reported; when the folder exists, every listed clip that
is missing (or empty) is reported and the utterance is kept text-only (`missing_media="keep"`)
or dropped (`missing_media="skip"`). Clips in the folder that no CSV row lists are reported too.
macOS resource-fork files (`._*`) are ignored.

Encoding: copies of the CSVs in the wild are clean UTF-8, cp1252, or carry mojibake (UTF-8 read
as cp1252: `â€™` for `’`). The file is decoded as UTF-8 and, failing that, as cp1252; every text
field is then repaired with `ftfy.fix_text` (curly quotes kept), so all three forms give the same
transcript.

Dialogue context: every utterance's `meta["context"]` holds the up to `CONTEXT_TURNS` turns before it
in its dialogue (speaker and transcript, oldest first); `data.text_context` feeds them to the text
encoder after the utterance.

Bad rows (wrong header, unknown emotion or sentiment, a missing field, a non-integer id, a
duplicate dialogue/utterance pair) raise `ValueError` naming the file and the CSV line.

    from mmer_dist.corpora.meld import read_meld
    utterances, report = read_meld("/data/MELD.Raw", missing_media="keep")
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from pathlib import Path

import ftfy

from mmer_dist.corpora.labels import MELD_LABELS
from mmer_dist.corpora.record import ReadReport, Utterance

SPLITS: tuple[str, ...] = ("train", "dev", "test")

CSV_NAMES: dict[str, str] = {
    "train": "train_sent_emo.csv",
    "dev": "dev_sent_emo.csv",
    "test": "test_sent_emo.csv",
}

CLIP_DIRS: dict[str, str] = {
    "train": "train_splits",
    "dev": "dev_splits_complete",
    "test": "output_repeated_splits_test",
}

COLUMNS: tuple[str, ...] = (
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
    "Season", "Episode", "StartTime", "EndTime",
)

SENTIMENTS: tuple[str, ...] = ("neutral", "positive", "negative")

# Columns that may be empty: the times are informative only (odd values exist in the release).
_OPTIONAL_COLUMNS = frozenset({"StartTime", "EndTime"})
# Free-text columns go through ftfy; the others are codes, ids and times (ASCII), only stripped.
_TEXT_COLUMNS = frozenset({"Utterance", "Speaker"})
_INT_COLUMNS: tuple[str, ...] = ("Sr No.", "Dialogue_ID", "Utterance_ID", "Season", "Episode")
_CLIP_RE = re.compile(r"^dia(\d+)_utt(\d+)\.mp4$", re.IGNORECASE)
_TIME_RE = re.compile(r"^\s*(?:(\d+):)?(\d+):(\d+)(?:[,.](\d+))?\s*$")

MISSING_MEDIA_CHOICES: tuple[str, ...] = ("keep", "skip")


CONTEXT_TURNS = 3
"""Previous turns of the dialogue stored with each utterance (`data.text_context` uses up to this many)."""


def clean_text(text: str) -> str:
    """Repair mojibake and stray encoding damage in one field; clean text comes back unchanged.

    `uncurl_quotes=False`: MELD's transcripts use typographic apostrophes and dashes, which are
    correct text, not damage; ftfy would otherwise straighten them.
    """
    return ftfy.fix_text(text, uncurl_quotes=False).strip()


def decode_csv_bytes(data: bytes) -> tuple[str, str]:
    """Decode a CSV file's bytes: UTF-8 (BOM stripped) or, failing that, cp1252.

    Returns (text, encoding used). The cp1252 fallback uses ftfy's "sloppy" variant, which
    also maps the five bytes cp1252 leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) instead of
    failing, so no byte is lost; `clean_text` then repairs any mojibake in the fields.
    """
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        import ftfy.bad_codecs  # noqa: F401  (registers "sloppy-windows-1252")

        return data.decode("sloppy-windows-1252"), "cp1252"


def parse_time(value: str) -> float | None:
    """Seconds of a MELD timestamp such as "00:16:16,059" or "0:36:59,425"; None if unparseable.

    Lenient on purpose: the release has one-digit hours and other odd values, and the times are
    informative only (clips are cut already).
    """
    m = _TIME_RE.match(value)
    if m is None:
        return None
    hours, minutes, seconds, frac = m.groups()
    total = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
    return total + (float(f"0.{frac}") if frac else 0.0)


def _index_clips(folder: Path, split: str, report: ReadReport) -> dict[tuple[int, int], Path]:
    """(dialogue, utterance) -> clip path for one split's clip folder; `._*` files are ignored."""
    clips: dict[tuple[int, int], Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("._") or not path.is_file():
            continue
        m = _CLIP_RE.match(path.name)
        if m is None:
            report.add("unrecognised_clip_name", f"{path} (expected dia{{D}}_utt{{U}}.mp4)", dropped=True)
            continue
        clips[(int(m.group(1)), int(m.group(2)))] = path
    return clips


def _row_error(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {message}")


def _read_split(
    path: Path, split: str, clip_dir: Path | None, missing_media: str, report: ReadReport,
) -> list[Utterance]:
    text, _encoding = decode_csv_bytes(path.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [clean_text(h) for h in next(reader)]
    except StopIteration:
        raise ValueError(f"{path} is empty; expected a MELD CSV with the header {', '.join(COLUMNS)}") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{path}: wrong header, missing column(s) {missing}; found {header}. "
            f"A MELD CSV has the columns {', '.join(COLUMNS)}"
        )
    col = {name: header.index(name) for name in COLUMNS}

    clips = _index_clips(clip_dir, split, report) if clip_dir is not None else None
    seen: dict[tuple[int, int], int] = {}
    turns: dict[int, list[tuple[int, str, str]]] = {}   # dialogue -> (utterance id, speaker, text), every row
    out: list[Utterance] = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank line (e.g. a trailing newline), not a record
        if len(row) != len(header):
            raise _row_error(path, line, f"has {len(row)} fields, expected {len(header)} ({', '.join(header)}); "
                                         f"check for an unquoted comma or a truncated row")
        values = {name: (clean_text(row[i]) if name in _TEXT_COLUMNS else row[i].strip()) for name, i in col.items()}
        empty = [name for name, v in values.items() if not v and name not in _OPTIONAL_COLUMNS]
        if empty:
            raise _row_error(path, line, f"missing value(s) for {empty}; every column except "
                                         f"StartTime/EndTime must be filled")
        ints: dict[str, int] = {}
        for name in _INT_COLUMNS:
            try:
                ints[name] = int(values[name])
            except ValueError:
                raise _row_error(path, line, f"{name}={values[name]!r} is not an integer") from None
        emotion = values["Emotion"].lower()
        if emotion not in MELD_LABELS:
            raise _row_error(path, line, f"unknown emotion {values['Emotion']!r}; expected one of {', '.join(MELD_LABELS)}")
        sentiment = values["Sentiment"].lower()
        if sentiment not in SENTIMENTS:
            raise _row_error(path, line, f"unknown sentiment {values['Sentiment']!r}; expected one of {', '.join(SENTIMENTS)}")

        dia, utt = ints["Dialogue_ID"], ints["Utterance_ID"]
        key = f"meld-{split}-dia{dia}_utt{utt}"
        if (dia, utt) in seen:
            raise _row_error(path, line, f"duplicate key {key}: Dialogue_ID={dia}, Utterance_ID={utt} "
                                         f"already on line {seen[(dia, utt)]}")
        seen[(dia, utt)] = line
        turns.setdefault(dia, []).append((utt, values["Speaker"], values["Utterance"]))

        clip: Path | None = None
        if clips is not None:
            clip = clips.pop((dia, utt), None)
            where = f"{clip_dir}/dia{dia}_utt{utt}.mp4 ({path.name}, line {line})"
            reason = None
            if clip is None:
                reason = "missing_clip"
            elif clip.stat().st_size == 0:
                reason, clip = "empty_clip", None
            if reason is not None:
                report.add(reason, where, dropped=missing_media == "skip")
                if missing_media == "skip":
                    continue

        out.append(Utterance(
            key=key,
            corpus="meld",
            split=split,
            label=emotion,
            label_id=MELD_LABELS.index(emotion),
            speaker=values["Speaker"],
            text=values["Utterance"],
            audio_path=clip,
            video_path=clip,
            meta={
                "dialogue_id": dia,
                "utterance_id": utt,
                "season": ints["Season"],
                "episode": ints["Episode"],
                "start": values["StartTime"],
                "end": values["EndTime"],
                "start_s": parse_time(values["StartTime"]),
                "end_s": parse_time(values["EndTime"]),
                "sentiment": sentiment,
                "sr_no": ints["Sr No."],
                "source": f"{path.name}:{line}",
            },
        ))
    if clips:
        for (dia, utt), clip in sorted(clips.items()):
            report.add("unlisted_clip", f"{clip} (no row in {path.name})", dropped=True)
    _attach_context(out, turns)
    return out


def _attach_context(utterances: list[Utterance], turns: dict[int, list[tuple[int, str, str]]]) -> None:
    """meta["context"]: the CONTEXT_TURNS turns before each utterance in its dialogue, oldest first, as
    {"speaker", "text"} (every CSV row counts, also one whose clip is missing); [] for a first turn."""
    for u in utterances:
        dia, utt = u.meta["dialogue_id"], u.meta["utterance_id"]
        before = sorted(t for t in turns[dia] if t[0] < utt)[-CONTEXT_TURNS:]
        u.meta["context"] = [{"speaker": speaker, "text": text} for _, speaker, text in before]


def read_meld(
    root: str | Path,
    *,
    splits: Iterable[str] | None = None,
    missing_media: str = "keep",
) -> tuple[list[Utterance], ReadReport]:
    """Read a MELD root: the CSVs present (train, dev, test) and their clips when the folders exist.

    Args:
        root: folder holding `{train,dev,test}_sent_emo.csv` and optionally the clip folders
            `train_splits/`, `dev_splits_complete/`, `output_repeated_splits_test/`.
        splits: read only these splits (each must have its CSV); default: every CSV present.
        missing_media: a listed clip missing from an existing clip folder is reported and the
            utterance is kept text-only ("keep") or dropped ("skip").

    Returns:
        (utterances in split then CSV order, report of missing/empty/unlisted clips).
        `audio_path` and `video_path` are both the clip (its audio track is the audio).
    """
    root = Path(root)
    if missing_media not in MISSING_MEDIA_CHOICES:
        raise ValueError(f"missing_media={missing_media!r}; expected one of {MISSING_MEDIA_CHOICES}")
    if not root.is_dir():
        raise ValueError(f"MELD root {root} is not a folder; pass the folder holding {', '.join(CSV_NAMES.values())}")
    present = [s for s in SPLITS if (root / CSV_NAMES[s]).is_file()]
    if not present:
        raise ValueError(
            f"{root} is not a MELD root: none of {', '.join(CSV_NAMES.values())} is there. "
            f"Pass the folder holding the MELD CSVs (e.g. MELD.Raw/)"
        )
    if splits is None:
        wanted = present
    else:
        wanted = list(splits)
        for s in wanted:
            if s not in SPLITS:
                raise ValueError(f"unknown MELD split {s!r}; expected one of {SPLITS}")
            if s not in present:
                raise ValueError(f"MELD split {s!r} asked for, but {root / CSV_NAMES[s]} does not exist")

    report = ReadReport()
    utterances: list[Utterance] = []
    for split in wanted:
        clip_dir = root / CLIP_DIRS[split]
        utterances += _read_split(
            root / CSV_NAMES[split], split, clip_dir if clip_dir.is_dir() else None, missing_media, report,
        )
    return utterances, report
