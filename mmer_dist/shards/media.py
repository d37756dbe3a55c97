"""Media transcoding for the packer, with PyAV (bundled FFmpeg; no system `ffmpeg` binary).

Two profiles:

- train: `encode_audio` decodes any audio (a wav/flac/mp3 file or the audio track of a
  video) to mono 16 kHz FLAC bytes; `encode_video` re-encodes a video track to a video-only
  H.264 mp4 whose short side is at most `size` pixels (never upscaled) at `fps` frames/s.
- raw: `verify_tracks` demuxes every packet of the original file once (no decode) to check it
  is readable and complete, and returns track durations; the packer stores the bytes untouched.

Output is byte-deterministic: one encoder thread, FFmpeg's `bitexact` flags (no library
version strings), no creation time, frame timestamps derived from the frame index.

Every failure raises `MediaError(reason, path, detail)` with one of `REASONS`, so the packer can
count bad inputs by reason instead of crashing:

    missing_file     the file does not exist
    unreadable_file  it exists but cannot be read (a directory, no permission, I/O error)
    empty_file       zero bytes
    truncated_media  the container declares more data than the file holds (cut-off download)
    corrupt_media    FFmpeg cannot parse or decode it
    no_audio_stream / no_video_stream   the file has no track of the wanted kind
    empty_audio / empty_video           the track decodes to nothing

    python -m mmer_dist.shards.media some_clip.mp4      # probe + transcode one file, print sizes
"""

from __future__ import annotations

import io
import os
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

REASONS = (
    "missing_file", "unreadable_file", "empty_file", "truncated_media", "corrupt_media",
    "no_audio_stream", "no_video_stream", "empty_audio", "empty_video",
)

# Reasons that make the whole file unusable (every track), as opposed to one track missing or empty.
FILE_REASONS = frozenset({"missing_file", "unreadable_file", "empty_file", "truncated_media", "corrupt_media"})

SAMPLE_RATE = 16000
# A decoded track may end this much before the duration the container declares without being
# called truncated (AAC priming, rounding of the last frame, variable frame rate).
_TRUNC_TOL_S = 0.25
_TRUNC_TOL_FRAC = 0.05
_BITEXACT = {"fflags": "+bitexact"}
# FFmpeg's default probe reads up to 5 MB / 5 s of a file to guess stream parameters (~30 ms per
# wav or mp4 here); mp4/wav/flac headers already say everything, so probe little and fall back to
# the full probe when a parameter is still unknown (`_params_known`).
_FAST_PROBE = {"probesize": "4096", "analyzeduration": "0"}


class MediaError(Exception):
    """A media file that cannot be used; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, path: str | Path, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Encoded:
    """Bytes of one transcoded (or verified raw) member and what they hold."""

    data: bytes
    ext: str                 # member extension: "flac", "mp4", or the raw file's own
    duration: float          # seconds actually decoded (raw: demuxed)


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` reads from the container header (no decoding)."""

    duration: float          # seconds, 0.0 when the container does not say
    has_audio: bool
    has_video: bool
    sample_rate: int = 0
    channels: int = 0
    width: int = 0
    height: int = 0
    fps: float = 0.0


# --------------------------------------------------------------------------- checks


def check_file(path: str | Path) -> int:
    """Size of a regular, readable, non-empty file, or `MediaError`."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaError("missing_file", path) from None
    except OSError as e:
        raise MediaError("unreadable_file", path, e.strerror or str(e)) from None
    if not os.path.isfile(path):
        raise MediaError("unreadable_file", path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise MediaError("unreadable_file", path, "no read permission")
    if st.st_size == 0:
        raise MediaError("empty_file", path)
    return st.st_size


def _structurally_truncated(path: Path) -> bool:
    """True when an mp4/mov box or a RIFF (wav) chunk claims bytes past the end of the file.

    FFmpeg reports a cut-off mp4 as "moov atom not found" (indistinguishable from garbage);
    walking the top-level boxes tells the two apart.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:4] == b"RIFF" and len(head) >= 8:
                riff = struct.unpack("<I", head[4:8])[0]
                if riff in (0, 0xFFFFFFFF) or riff >= 0xFFFFFF00:   # streaming writers leave it unset
                    return False
                return riff + 8 > size + 1                         # +1: a tolerated missing pad byte
            if head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
                return False
            pos = 0
            while pos + 8 <= size:
                f.seek(pos)
                box = f.read(16)
                n = struct.unpack(">I", box[:4])[0]
                if n == 1 and len(box) >= 16:
                    n = struct.unpack(">Q", box[8:16])[0]
                elif n == 0:          # box runs to the end of the file
                    return False
                if n < 8:
                    return False
                if pos + n > size:
                    return True
                pos += n
            return pos < size and size - pos < 8
    except OSError:
        return False


def _params_known(container: av.container.InputContainer) -> bool:
    for s in container.streams.audio:
        if not s.codec_context.sample_rate or not s.codec_context.channels:
            return False
    for s in container.streams.video:
        if not s.codec_context.width or not s.codec_context.height:
            return False
    return True


def _open(path: Path) -> av.container.InputContainer:
    check_file(path)
    truncated = _structurally_truncated(path)
    try:
        container = av.open(str(path), mode="r", options=_FAST_PROBE)
        if not _params_known(container):      # a format that needs the full probe: open again with it
            container.close()
            container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise MediaError("truncated_media" if truncated else "corrupt_media", path, str(e)) from None
    except OSError as e:
        raise MediaError("unreadable_file", path, e.strerror or str(e)) from None
    if truncated:   # FFmpeg opens e.g. a cut-off wav quietly and clamps the duration to what is there
        container.close()
        raise MediaError("truncated_media", path, "a chunk/box header claims bytes past the end of the file")
    return container


def _declared(container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _check_complete(path: Path, got: float, declared: float) -> None:
    if declared > 0 and got + max(_TRUNC_TOL_S, _TRUNC_TOL_FRAC * declared) < declared:
        raise MediaError("truncated_media", path, f"decoded {got:.2f} s of the {declared:.2f} s the header declares")


def probe(path: str | Path) -> MediaInfo:
    """Duration and tracks of a media file from its header (`MediaError` when unusable)."""
    path = Path(path)
    with _open(path) as c:
        a = c.streams.audio[0] if c.streams.audio else None
        v = c.streams.video[0] if c.streams.video else None
        dur = c.duration / av.time_base if c.duration is not None else max(
            [_declared(c, s) for s in (a, v) if s is not None] or [0.0])
        return MediaInfo(
            duration=float(dur), has_audio=a is not None, has_video=v is not None,
            sample_rate=a.rate if a is not None else 0, channels=a.channels if a is not None else 0,
            width=v.width if v is not None else 0, height=v.height if v is not None else 0,
            fps=float(v.average_rate) if v is not None and v.average_rate else 0.0,
        )


# --------------------------------------------------------------------------- train profile


def encode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> Encoded:
    """The first audio track of `path`, downmixed to mono, resampled, as FLAC bytes."""
    path = Path(path)
    buf = io.BytesIO()
    with _open(path) as inp:
        if not inp.streams.audio:
            raise MediaError("no_audio_stream", path)
        src = inp.streams.audio[0]
        declared = _declared(inp, src)
        out = av.open(buf, mode="w", format="flac", options=_BITEXACT)
        try:
            st = out.add_stream("flac", rate=sample_rate, layout="mono", format="s16")
            st.codec_context.thread_count = 1
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            n = 0
            try:
                for frame in inp.decode(src):
                    frame.pts = None          # let the resampler count samples itself
                    for o in resampler.resample(frame):
                        n += o.samples
                        out.mux(st.encode(o))
            except av.error.FFmpegError as e:
                reason = "truncated_media" if _structurally_truncated(path) else "corrupt_media"
                raise MediaError(reason, path, f"decoding audio: {e}") from None
            for o in resampler.resample(None):
                n += o.samples
                out.mux(st.encode(o))
            if n == 0:
                raise MediaError("empty_audio", path, "no audio samples decoded")
            out.mux(st.encode(None))
        finally:
            out.close()
    duration = n / sample_rate
    _check_complete(path, duration, declared)
    return Encoded(buf.getvalue(), "flac", duration)


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the short side at most `size` (never upscaled), aspect kept, both even."""
    short = min(width, height)
    scale = min(1.0, size / short) if short > 0 else 1.0
    return _even(width * scale), _even(height * scale)


def encode_video(path: str | Path, size: int = 224, fps: float = 8.0, crf: int = 23,
                 preset: str = "veryfast") -> Encoded:
    """The first video track of `path` as a video-only H.264 mp4 (short side <= size, `fps`).

    Output frame k shows the first source frame whose time reaches k / fps (within half a
    source frame), so a 25 fps clip at 8 fps keeps every ~3rd frame and a 5 fps clip repeats.
    """
    path = Path(path)
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with _open(path) as inp:
        if not inp.streams.video:
            raise MediaError("no_video_stream", path)
        src = inp.streams.video[0]
        declared = _declared(inp, src)
        half = 0.5 / float(src.average_rate) if src.average_rate else 0.0
        w, h = target_size(src.width, src.height, size)
        out = av.open(buf, mode="w", format="mp4", options=_BITEXACT)
        try:
            st = out.add_stream("libx264", rate=rate,
                                options={"crf": str(crf), "preset": preset, "threads": "1"})
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.codec_context.thread_count = 1
            k, t0, last = 0, None, 0.0
            try:
                for frame in inp.decode(src):
                    if frame.time is None:
                        continue
                    t0 = frame.time if t0 is None else t0
                    last = frame.time - t0
                    small = None
                    while last + half >= k / float(rate):
                        small = small or frame.reformat(width=w, height=h, format="yuv420p",
                                                        interpolation="AREA")
                        small.pts, small.time_base = k, 1 / rate
                        out.mux(st.encode(small))
                        k += 1
            except av.error.FFmpegError as e:
                reason = "truncated_media" if _structurally_truncated(path) else "corrupt_media"
                raise MediaError(reason, path, f"decoding video: {e}") from None
            if k == 0:
                raise MediaError("empty_video", path, "no video frames decoded")
            out.mux(st.encode(None))
        finally:
            out.close()
    frame_dur = 2 * half
    _check_complete(path, last + frame_dur, declared)
    return Encoded(buf.getvalue(), "mp4", k / float(rate))


# --------------------------------------------------------------------------- raw profile


def verify_tracks(path: str | Path, kinds: tuple[str, ...] = ("audio", "video")) -> dict[str, float | MediaError]:
    """Demux every packet of the first track of each kind ("audio"/"video") in ONE pass.

    Cheap next to decoding (no codec runs) yet catches unparsable, cut-off and empty files.
    Returns kind -> duration in seconds, or kind -> `MediaError` for a kind that is absent or
    empty (the other kinds stay usable); a problem with the whole file raises `MediaError`.
    """
    path = Path(path)
    result: dict[str, float | MediaError] = {}
    with _open(path) as inp:
        streams = {}
        for kind in kinds:
            found = inp.streams.audio if kind == "audio" else inp.streams.video
            if found:
                streams[kind] = found[0]
            else:
                result[kind] = MediaError(f"no_{kind}_stream", path)
        if not streams:
            return result
        by_index = {s.index: k for k, s in streams.items()}
        last = {k: 0 for k in streams}         # max(pts + duration) in stream time-base units (ints:
        count = {k: 0 for k in streams}        # no Fraction per packet, the loop is the raw profile's cost)
        try:
            for pkt in inp.demux(*streams.values()):
                k = by_index.get(pkt.stream_index)
                if k is None or pkt.size == 0:
                    continue
                count[k] += 1
                pts = pkt.pts
                if pts is not None:
                    last[k] = max(last[k], pts + (pkt.duration or 0))
        except av.error.FFmpegError as e:
            reason = "truncated_media" if _structurally_truncated(path) else "corrupt_media"
            raise MediaError(reason, path, f"demuxing: {e}") from None
        end: dict[str, float] = {}
        for k, st in streams.items():
            if count[k] == 0:
                result[k] = MediaError(f"empty_{k}", path, f"no {k} packets")
                continue
            tb = st.time_base or Fraction(0)
            end[k] = float((last[k] - (st.start_time or 0)) * tb)
            declared = _declared(inp, st)
            _check_complete(path, end[k], declared)     # a cut-off file is broken for every track
            result[k] = end[k] if end[k] > 0 else declared
    return result


def read_bytes(path: str | Path) -> bytes:
    """The whole file, with `MediaError` instead of OSError."""
    check_file(path)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise MediaError("unreadable_file", path, e.strerror or str(e)) from None


def main(argv: list[str] | None = None) -> int:
    for p in (sys.argv[1:] if argv is None else argv):
        try:
            info = probe(p)
            print(p, info)
            if info.has_audio:
                a = encode_audio(p)
                print(f"  audio -> flac {len(a.data)} bytes, {a.duration:.2f} s")
            if info.has_video:
                v = encode_video(p)
                print(f"  video -> mp4 {len(v.data)} bytes, {v.duration:.2f} s")
        except MediaError as e:
            print(p, "ERROR", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
