"""Unit tests of the MELD reader: tiny CSVs (and empty clip files) built in tmp_path.

    .venv/bin/pytest tests/unit/test_meld_reader.py -q
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from mmer_dist.corpora import read_corpus
from mmer_dist.corpora.labels import MELD_LABELS
from mmer_dist.corpora.meld import CLIP_DIRS, COLUMNS, clean_text, decode_csv_bytes, parse_time, read_meld

ROWS = [
    # Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode, StartTime, EndTime
    ["1", "You must’ve had your hands full.", "The Interviewer", "neutral", "neutral", "0", "0", "8", "21",
     "00:16:21,940", "00:16:23,442"],
    ["2", "That I did. That I did — honestly…", "Chandler", "joy", "positive", "0", "1", "8", "21",
     "00:16:23,442", "00:16:26,737"],
    ["3", "Oh my God, “Café” Pérez!", "Monica", "surprise", "positive", "1", "0", "2", "3",
     "0:05:52,435", "0:05:53,897"],
    ["4", "No, get out.", "Ross", "anger", "negative", "1", "1", "2", "3", "odd", ""],
]


def csv_text(rows: list[list[str]], header: list[str] | tuple[str, ...] = COLUMNS) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(root: Path, split: str = "train", rows: list[list[str]] = ROWS, *,
              encoding: str = "utf-8", header: list[str] | tuple[str, ...] = COLUMNS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{split}_sent_emo.csv"
    path.write_bytes(csv_text(rows, header).encode(encoding))
    return path


def mojibake(text: str) -> str:
    """UTF-8 read as cp1252 (the sloppy variant keeps the bytes cp1252 leaves undefined)."""
    import ftfy.bad_codecs  # noqa: F401

    return text.encode("utf-8").decode("sloppy-windows-1252")


# ----------------------------------------------------------------------------- happy path

def test_reads_rows_keys_labels_and_meta(tmp_path: Path) -> None:
    write_csv(tmp_path)
    utts, report = read_meld(tmp_path)
    assert [u.key for u in utts] == ["meld-train-dia0_utt0", "meld-train-dia0_utt1",
                                     "meld-train-dia1_utt0", "meld-train-dia1_utt1"]
    u = utts[1]
    assert (u.corpus, u.split, u.label, u.speaker) == ("meld", "train", "joy", "Chandler")
    assert u.label_id == MELD_LABELS.index("joy")
    assert u.text == "That I did. That I did — honestly…"
    assert u.audio_path is None and u.video_path is None
    assert u.meta["dialogue_id"] == 0 and u.meta["utterance_id"] == 1
    assert (u.meta["season"], u.meta["episode"], u.meta["sr_no"]) == (8, 21, 2)
    assert u.meta["sentiment"] == "positive"
    assert (u.meta["start"], u.meta["end"]) == ("00:16:23,442", "00:16:26,737")
    # Odd times are kept as strings and parsed leniently.
    assert utts[3].meta["start"] == "odd" and utts[3].meta["start_s"] is None and utts[3].meta["end"] == ""
    assert utts[2].meta["start_s"] == pytest.approx(352.435)
    assert report.to_dict() == {"skipped": {}, "degraded": {}, "examples": {}}


def test_dialogue_context_is_the_previous_turns(tmp_path: Path) -> None:
    rows = [list(ROWS[2]), list(ROWS[0]), list(ROWS[1])]            # CSV order need not be dialogue order
    rows += [[str(5 + i), f"line {i}", "Joey", "neutral", "neutral", "0", str(2 + i), "8", "21", "", ""]
             for i in range(3)]                                    # dialogue 0: utterances 0..4
    write_csv(tmp_path, rows=rows)
    utts = {u.key: u for u in read_meld(tmp_path)[0]}
    assert utts["meld-train-dia0_utt0"].meta["context"] == [] and utts["meld-train-dia1_utt0"].meta["context"] == []
    assert utts["meld-train-dia0_utt1"].meta["context"] == [
        {"speaker": "The Interviewer", "text": "You must’ve had your hands full."}]
    last = utts["meld-train-dia0_utt4"].meta["context"]               # CONTEXT_TURNS = 3, oldest first
    assert [t["text"] for t in last] == ["That I did. That I did — honestly…", "line 0", "line 1"]


def test_only_present_csvs_are_read_and_dispatcher(tmp_path: Path) -> None:
    write_csv(tmp_path, "dev", ROWS[:2])
    write_csv(tmp_path, "test", ROWS[2:])
    utts, _ = read_corpus("meld", tmp_path)
    assert [(u.split, u.key) for u in utts] == [
        ("dev", "meld-dev-dia0_utt0"), ("dev", "meld-dev-dia0_utt1"),
        ("test", "meld-test-dia1_utt0"), ("test", "meld-test-dia1_utt1")]
    only_test, _ = read_meld(tmp_path, splits=["test"])
    assert {u.split for u in only_test} == {"test"}
    with pytest.raises(ValueError, match="train_sent_emo.csv does not exist"):
        read_meld(tmp_path, splits=["train"])
    with pytest.raises(ValueError, match="unknown MELD split 'val'"):
        read_meld(tmp_path, splits=["val"])


def test_parse_time() -> None:
    assert parse_time("00:16:16,059") == pytest.approx(976.059)
    assert parse_time("0:36:59,425") == pytest.approx(2219.425)
    assert parse_time("01:02") == pytest.approx(62.0)
    assert parse_time("") is None and parse_time("soon") is None


# ----------------------------------------------------------------------------- encodings

def test_cp1252_and_mojibake_give_the_clean_transcripts(tmp_path: Path) -> None:
    clean, _ = read_meld(write_csv(tmp_path / "utf8").parent)
    cp, _ = read_meld(write_csv(tmp_path / "cp1252", encoding="cp1252").parent)
    moji_root = tmp_path / "moji"
    moji_root.mkdir()
    (moji_root / "train_sent_emo.csv").write_text(mojibake(csv_text(ROWS)), encoding="utf-8", newline="")
    assert "â€™" in (moji_root / "train_sent_emo.csv").read_text(encoding="utf-8")
    moji, _ = read_meld(moji_root)
    expected = [r[1] for r in ROWS]
    assert [u.text for u in clean] == expected
    assert [u.text for u in cp] == expected
    assert [u.text for u in moji] == expected
    assert [u.speaker for u in moji] == [r[2] for r in ROWS]


def test_decode_and_clean_helpers() -> None:
    assert decode_csv_bytes("a’b".encode("utf-8")) == ("a’b", "utf-8")
    assert decode_csv_bytes("\ufeffa’b".encode("utf-8")) == ("a’b", "utf-8")
    assert decode_csv_bytes("a’b".encode("cp1252")) == ("a’b", "cp1252")
    # Bytes cp1252 leaves undefined do not crash the fallback.
    assert decode_csv_bytes(b"a\x92\x9db")[1] == "cp1252"
    assert clean_text("youâ€™re â€” heyâ€¦") == "you’re — hey…"
    assert clean_text("It’s “fine” — really…") == "It’s “fine” — really…"   # clean text untouched


def test_utf8_bom_header(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "train_sent_emo.csv").write_bytes(b"\xef\xbb\xbf" + csv_text(ROWS).encode("utf-8"))
    utts, _ = read_meld(tmp_path)
    assert len(utts) == len(ROWS)


# ----------------------------------------------------------------------------- bad input

def test_root_without_csv_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a MELD root: none of train_sent_emo.csv"):
        read_meld(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        read_meld(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown corpus 'iemocap'"):
        read_corpus("iemocap", tmp_path)


def test_wrong_header_names_file_and_missing_columns(tmp_path: Path) -> None:
    header = [c for c in COLUMNS if c not in ("Emotion", "Season")]
    path = write_csv(tmp_path, rows=[], header=header)
    with pytest.raises(ValueError) as err:
        read_meld(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "missing column(s) ['Emotion', 'Season']" in msg


def test_empty_csv_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "dev_sent_emo.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="dev_sent_emo.csv is empty"):
        read_meld(tmp_path)


def test_unknown_emotion_names_file_line_and_choices(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[2][3] = "contempt"
    path = write_csv(tmp_path, rows=rows)
    with pytest.raises(ValueError) as err:
        read_meld(tmp_path)
    msg = str(err.value)
    # header is line 1, so the third row is line 4
    assert f"{path}, line 4" in msg and "unknown emotion 'contempt'" in msg and "neutral, joy" in msg


def test_unknown_sentiment(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[0][4] = "meh"
    write_csv(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"line 2: unknown sentiment 'meh'"):
        read_meld(tmp_path)


def test_missing_field_and_short_row(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[1][2] = ""  # no speaker
    write_csv(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"train_sent_emo.csv, line 3: missing value\(s\) for \['Speaker'\]"):
        read_meld(tmp_path)
    rows = [list(r) for r in ROWS]
    rows[3] = rows[3][:7]
    write_csv(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"line 5: has 7 fields, expected 11"):
        read_meld(tmp_path)


def test_line_numbers_count_multiline_fields(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[0][1] = "two\nlines"
    rows[1][6] = "x"
    write_csv(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"line 4: Utterance_ID='x' is not an integer"):
        read_meld(tmp_path)


def test_non_integer_ids(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[2][5] = "1.5"
    write_csv(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"line 4: Dialogue_ID='1.5' is not an integer"):
        read_meld(tmp_path)


def test_duplicate_key(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS] + [list(ROWS[1])]
    write_csv(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"line 6: duplicate key meld-train-dia0_utt1.*already on line 3"):
        read_meld(tmp_path)


def test_bad_missing_media_option(tmp_path: Path) -> None:
    write_csv(tmp_path)
    with pytest.raises(ValueError, match="missing_media='drop'"):
        read_meld(tmp_path, missing_media="drop")


# ----------------------------------------------------------------------------- clips

def make_clips(root: Path, split: str, names: list[str]) -> Path:
    folder = root / CLIP_DIRS[split]
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\x00\x00\x00\x18ftypmp42")
    return folder


def test_clips_found_resource_forks_ignored_missing_kept(tmp_path: Path) -> None:
    write_csv(tmp_path)
    folder = make_clips(tmp_path, "train", ["dia0_utt0.mp4", "dia0_utt1.mp4", "dia1_utt1.mp4",
                                            "._dia1_utt0.mp4", "._dia0_utt0.mp4"])
    utts, report = read_meld(tmp_path)  # missing_media="keep" by default
    by_key = {u.key: u for u in utts}
    assert len(utts) == 4
    assert by_key["meld-train-dia0_utt0"].video_path == folder / "dia0_utt0.mp4"
    assert by_key["meld-train-dia0_utt0"].audio_path == folder / "dia0_utt0.mp4"
    # The ._ file does not stand in for the missing dia1_utt0 clip.
    assert by_key["meld-train-dia1_utt0"].video_path is None and by_key["meld-train-dia1_utt0"].audio_path is None
    assert by_key["meld-train-dia1_utt0"].text == ROWS[2][1]
    assert report.degraded == {"missing_clip": 1} and not report.skipped
    assert "dia1_utt0.mp4" in report.examples["missing_clip"][0]
    assert "line 4" in report.examples["missing_clip"][0]


def test_missing_clip_skip(tmp_path: Path) -> None:
    write_csv(tmp_path)
    make_clips(tmp_path, "train", ["dia0_utt0.mp4", "dia0_utt1.mp4"])
    utts, report = read_meld(tmp_path, missing_media="skip")
    assert [u.key for u in utts] == ["meld-train-dia0_utt0", "meld-train-dia0_utt1"]
    assert report.skipped == {"missing_clip": 2} and not report.degraded


def test_empty_unlisted_and_misnamed_clips_are_reported(tmp_path: Path) -> None:
    write_csv(tmp_path)
    folder = make_clips(tmp_path, "train", ["dia0_utt0.mp4", "dia0_utt1.mp4", "dia1_utt0.mp4", "dia1_utt1.mp4",
                                            "dia9_utt9.mp4", "notes.txt"])
    (folder / "dia0_utt1.mp4").write_bytes(b"")
    utts, report = read_meld(tmp_path)
    assert len(utts) == 4
    assert report.degraded == {"empty_clip": 1}
    assert report.skipped == {"unlisted_clip": 1, "unrecognised_clip_name": 1}
    assert {u.key for u in utts if u.video_path is None} == {"meld-train-dia0_utt1"}


def test_clip_folder_per_split(tmp_path: Path) -> None:
    """A split without its clip folder is text-only and not reported, even if another split has clips."""
    write_csv(tmp_path, "train", ROWS[:2])
    write_csv(tmp_path, "dev", ROWS[2:])
    make_clips(tmp_path, "train", ["dia0_utt0.mp4"])
    utts, report = read_meld(tmp_path)
    assert [u.video_path is not None for u in utts] == [True, False, False, False]
    assert report.degraded == {"missing_clip": 1}   # train's dia0_utt1 only; dev has no folder
