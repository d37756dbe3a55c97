"""Unit tests of mmer_dist.shards.media: transcoding, determinism, and every bad-input reason.

Tiny media are made on the fly with PyAV in tmp_path (under a second in total).
"""

from __future__ import annotations

import io
import os
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from helpers import verify_media
from mmer_dist.shards import media
from mmer_dist.shards.media import MediaError


def make_mp4(path: Path, *, seconds: float = 1.0, fps: int = 25, size: tuple[int, int] = (96, 64),
             audio: bool = True, video: bool = True, sr: int = 44100) -> Path:
    with av.open(str(path), "w", format="mp4") as c:
        if video:
            v = c.add_stream("libx264", rate=fps, options={"threads": "1", "preset": "ultrafast"})
            v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        if audio:
            a = c.add_stream("aac", rate=sr)
            a.layout = "stereo"
        if video:
            for i in range(int(seconds * fps)):
                img = np.full((size[1], size[0], 3), (i * 9) % 255, np.uint8)
                img[: size[1] // 2, : size[0] // 3] = 200
                c.mux(v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(v.encode(None))
        if audio:
            t = np.arange(int(seconds * sr)) / sr
            x = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
            for start in range(0, len(x), 1024):
                chunk = np.ascontiguousarray(np.stack([x[start:start + 1024]] * 2))
                fr = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                fr.sample_rate, fr.pts = sr, start
                c.mux(a.encode(fr))
            c.mux(a.encode(None))
    return path


def make_wav(path: Path, seconds: float = 1.0, sr: int = 48000, channels: int = 2) -> Path:
    n = int(seconds * sr)
    x = (np.sin(2 * np.pi * 220 * np.arange(n) / sr) * 10000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(np.repeat(x[:, None], channels, axis=1).tobytes())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    return {
        "av": make_mp4(d / "av.mp4"),
        "video_only": make_mp4(d / "v.mp4", audio=False),
        "wav": make_wav(d / "a.wav"),
    }


def _decode_audio(data: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        n = sum(f.samples for f in c.decode(s))
        return s.rate, s.channels, n


def test_audio_to_mono_16k_flac(files: dict[str, Path]) -> None:
    for name in ("wav", "av"):
        enc = media.encode_audio(files[name])
        assert enc.ext == "flac" and enc.data[:4] == b"fLaC"
        rate, channels, n = _decode_audio(enc.data)
        assert (rate, channels) == (16000, 1)
        assert abs(n / 16000 - 1.0) < 0.05, (name, n)
        assert enc.duration == pytest.approx(n / 16000)
        assert media.encode_audio(files[name]).data == enc.data, "audio encoding is not deterministic"
        assert b"Lavf" not in enc.data and b"Lavc" not in enc.data   # bitexact: no version strings


def test_video_reencoded_small_fps_no_audio(files: dict[str, Path]) -> None:
    enc = media.encode_video(files["av"], size=32, fps=8)
    assert enc.ext == "mp4"
    with av.open(io.BytesIO(enc.data)) as c:
        assert not c.streams.audio, "the training mp4 must be video-only (audio goes to .flac)"
        v = c.streams.video[0]
        assert (v.width, v.height) == (48, 32)
        assert v.average_rate == Fraction(8)
        times = [f.time for f in c.decode(v)]
    assert len(times) == 8 and times[1] == pytest.approx(0.125)
    assert media.encode_video(files["av"], size=32, fps=8).data == enc.data, "video encoding is not deterministic"


def test_video_never_upscaled_and_target_size() -> None:
    assert media.target_size(96, 64, 224) == (96, 64)
    assert media.target_size(1280, 720, 224) == (398, 224)
    assert media.target_size(720, 1280, 224) == (224, 398)
    assert media.target_size(101, 51, 32) == (64, 32)


def test_probe_and_verify(files: dict[str, Path]) -> None:
    info = media.probe(files["av"])
    assert info.has_audio and info.has_video and info.width == 96 and info.fps == 25
    assert info.duration == pytest.approx(1.0, abs=0.1)
    assert verify_media(files["av"], "video") == pytest.approx(1.0, abs=0.05)
    assert verify_media(files["wav"], "audio") == pytest.approx(1.0, abs=0.01)
    with pytest.raises(MediaError) as e:
        verify_media(files["video_only"], "audio")
    assert e.value.reason == "no_audio_stream"


def _reason(fn, *args) -> str:  # noqa: ANN001
    with pytest.raises(MediaError) as e:
        fn(*args)
    assert str(e.value.path) in str(e.value)
    return e.value.reason


def test_bad_inputs_have_reasons(tmp_path: Path, files: dict[str, Path]) -> None:
    assert _reason(media.encode_audio, tmp_path / "nope.wav") == "missing_file"
    (tmp_path / "dir.wav").mkdir()
    assert _reason(media.encode_audio, tmp_path / "dir.wav") == "unreadable_file"
    (tmp_path / "zero.wav").write_bytes(b"")
    assert _reason(media.encode_audio, tmp_path / "zero.wav") == "empty_file"
    assert _reason(verify_media, tmp_path / "zero.wav", "audio") == "empty_file"
    # seeded junk: os.urandom sometimes looked like another format to FFmpeg's probe (no_video_stream)
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert _reason(media.encode_video, tmp_path / "junk.mp4") == "corrupt_media"
    assert _reason(verify_media, tmp_path / "junk.mp4", "video") == "corrupt_media"
    data = files["av"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    assert _reason(media.encode_video, tmp_path / "cut.mp4") == "truncated_media"
    assert _reason(media.encode_audio, tmp_path / "cut.mp4") == "truncated_media"
    wav = files["wav"].read_bytes()
    (tmp_path / "cut.wav").write_bytes(wav[: len(wav) // 2])
    assert _reason(media.encode_audio, tmp_path / "cut.wav") == "truncated_media"
    assert _reason(verify_media, tmp_path / "cut.wav", "audio") == "truncated_media"
    make_wav(tmp_path / "silent0.wav", seconds=0.0)          # a valid header, zero samples
    assert _reason(media.encode_audio, tmp_path / "silent0.wav") == "empty_audio"
    assert _reason(media.encode_audio, files["video_only"]) == "no_audio_stream"
    assert _reason(media.encode_video, files["wav"]) == "no_video_stream"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_no_permission_is_unreadable(tmp_path: Path, files: dict[str, Path]) -> None:
    p = tmp_path / "locked.wav"
    p.write_bytes(files["wav"].read_bytes())
    p.chmod(0)
    assert _reason(media.encode_audio, p) == "unreadable_file"
