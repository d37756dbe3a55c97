"""Synthetic media: how an emotion sounds, looks and reads, rendered to real wav/mp4 files.

    import numpy as np
    from mmer_dist.corpora.synthetic_media import draw_take, render_audio, render_frames, write_mp4
    rng = np.random.default_rng(0)
    take = draw_take("anger", rng)                     # one sample's speaker, intensity, ambiguity
    audio = render_audio(take, 16000, 1.5, rng)        # float32 mono in [-1, 1]
    frames = render_frames(take, 15, 64, 10.0, rng)    # uint8 [15, 64, 64, 3]
    write_mp4("/tmp/anger.mp4", frames, 10.0, audio, 16000)

`synth_text`, `synth_audio` and `synth_frames` draw a random speaker in one call (tests use them
for awkward media); `write_wav` writes 16-bit PCM. The corpus layouts that use all this (MELD,
RAVDESS) are in mmer_dist/corpora/synthetic.py.

Design: how the emotion shows up in each modality
-------------------------------------------------
Each emotion has an `Expression`: voice parameters (pitch multiplier of the speaker's base f0,
pitch glide over the utterance, vibrato depth, energy, syllable rate, harmonic roll-off,
breathiness) and face parameters (mouth curvature, mouth opening, mouth skew, brow tilt and
height, eye opening). A sample ("take") renders:

- audio: a harmonic voiced tone (up to 24 harmonics) on the speaker's base f0 (male ~110 Hz,
  female ~210 Hz, per-speaker offset) shaped by the expression, amplitude-modulated by a
  syllable envelope, plus breath noise and background noise;
- video: a face drawn with numpy on a random background: face ellipse (speaker skin tone),
  hair, eyes (opening), brows (tilt: inner end down = anger, up = sadness/fear; height), and a
  mouth curve (smile/frown, skew for disgust) whose opening follows the same syllable envelope
  as the audio, with head jitter and pixel noise;
- text (MELD only; RAVDESS has its two fixed statements): 1-2 emotion-specific words or phrases
  mixed into neutral filler ("so", "I", "Rachel", "don't", ...), sometimes an emotion-typical
  punctuation mark.

Per-sample randomness keeps any single feature from solving it: speaker f0 and timbre,
expression intensity (non-neutral classes are interpolated toward neutral by a random amount,
so weak expressions look neutral-ish, as in MELD), small Gaussian jitter of every parameter,
head position, background, noise. `noise` (default 0.15) is the probability, drawn
independently per modality, that a sample's cue in that modality is *ambiguous*: blended
50-100% toward another random class (text: another class's words, or filler only). One
modality alone therefore tops out around (1 - noise); fusing the three recovers most samples,
because the modalities are rarely ambiguous at the same time. Rare classes (MELD proportions:
fear and disgust ~3%) stay learnable but are easy to under-fit without reweighting.

Determinism: the renderers draw only from the generator they are given. `write_mp4` encodes
single-threaded (x264 `threads=1`), muxers and codecs get `bitexact` and no creation time is
written, so the same inputs give identical bytes with the same PyAV/FFmpeg build.
"""

from __future__ import annotations

import dataclasses
import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmer_dist.corpora.labels import MELD_LABELS

# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Expression:
    """How one emotion shows in the voice and the face (interpolated for weak/ambiguous cues)."""

    pitch: float        # multiplier of the speaker's base f0
    glide: float        # relative pitch change from start to end of the utterance (+ rising)
    vibrato: float      # relative vibrato depth (6 Hz)
    energy: float       # peak amplitude, 0..1
    tempo: float        # syllables per second (amplitude envelope rate)
    rolloff: float      # harmonic amplitude ~ k**-rolloff (low = bright/tense voice)
    breath: float       # breath-noise share
    smile: float        # mouth curvature: +1 corners up, -1 corners down
    mouth_open: float   # mouth opening while talking, 0..1
    skew: float         # mouth asymmetry (one corner up, the other down)
    brow_tilt: float    # +1 inner ends raised (sad, fear), -1 inner ends lowered (anger)
    brow_raise: float   # brows up (+) or down (-)
    eye_open: float     # eye height factor (1 = neutral)


# Keyed by emotion "profile"; RAVDESS names map onto these below (calm has its own).
EXPRESSIONS: dict[str, Expression] = {
    "neutral": Expression(1.00, 0.00, 0.00, 0.50, 4.0, 1.6, 0.05, 0.0, 0.15, 0.0, 0.0, 0.0, 1.00),
    "calm": Expression(0.90, -0.04, 0.00, 0.33, 2.6, 2.2, 0.10, 0.4, 0.05, 0.0, 0.0, -0.3, 0.55),
    "joy": Expression(1.30, 0.06, 0.03, 0.75, 5.0, 1.2, 0.03, 1.0, 0.45, 0.0, 0.0, 0.3, 0.80),
    "surprise": Expression(1.50, 0.35, 0.00, 0.70, 3.0, 1.4, 0.05, 0.0, 1.00, 0.0, 0.2, 1.0, 1.50),
    "anger": Expression(1.10, -0.06, 0.00, 1.00, 6.0, 0.8, 0.08, -0.4, 0.35, 0.0, -1.0, -0.6, 0.85),
    "sadness": Expression(0.80, -0.20, 0.00, 0.28, 2.0, 2.6, 0.12, -1.0, 0.05, 0.0, 1.0, 0.2, 0.65),
    "disgust": Expression(0.88, 0.00, 0.00, 0.55, 3.2, 1.6, 0.35, -0.3, 0.20, 0.9, -0.4, -0.3, 0.50),
    "fear": Expression(1.40, 0.00, 0.08, 0.50, 7.0, 1.8, 0.15, -0.4, 0.60, 0.0, 0.8, 0.8, 1.35),
}
PROFILE_OF: dict[str, str] = {
    **{name: name for name in MELD_LABELS},
    "calm": "calm", "happy": "joy", "sad": "sadness", "angry": "anger",
    "fearful": "fear", "surprised": "surprise",
}

# Text cues (MELD). Filler carries no emotion; it includes U+2019 apostrophes like the real CSVs.
WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("okay", "tomorrow", "coffee", "apartment", "meeting", "sure", "table", "phone", "dinner", "later"),
    "joy": ("great", "love it", "wonderful", "awesome", "yay", "fantastic", "so happy", "amazing", "perfect"),
    "surprise": ("wow", "seriously", "whoa", "unbelievable", "no way", "oh my god", "are you kidding", "really"),
    "anger": ("hate", "stupid", "shut up", "damn", "furious", "idiot", "ridiculous", "stop it", "get out"),
    "sadness": ("sorry", "miss him", "alone", "lost", "cry", "it hurts", "terrible", "gone", "heartbroken"),
    "disgust": ("gross", "ew", "disgusting", "yuck", "nasty", "sick", "eww", "revolting", "smells"),
    "fear": ("scared", "afraid", "help", "nervous", "terrified", "worried", "panic", "careful", "creepy"),
}
FILLER: tuple[str, ...] = (
    "I", "you", "we", "it", "the", "a", "that", "this", "just", "so", "know", "think", "is", "was", "to",
    "and", "about", "here", "there", "with", "Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe",
    "guys", "now", "like", "um", "well", "I\u2019m", "don\u2019t", "it\u2019s", "gonna", "then",
)
PUNCTUATION: dict[str, str] = {
    "neutral": ".", "joy": "!", "surprise": "?!", "anger": "!", "sadness": "...", "disgust": ".", "fear": "?",
}


def expression(label: str, intensity: float = 1.0) -> Expression:
    """The `Expression` of a MELD or RAVDESS label, moved toward neutral for intensity < 1."""
    try:
        profile = EXPRESSIONS[PROFILE_OF[label]]
    except KeyError:
        raise ValueError(f"unknown emotion {label!r}; expected one of {sorted(PROFILE_OF)}") from None
    return mix(EXPRESSIONS["neutral"], profile, intensity)


def mix(a: Expression, b: Expression, w: float) -> Expression:
    """(1 - w) * a + w * b, field by field."""
    return Expression(*[(1 - w) * getattr(a, f.name) + w * getattr(b, f.name) for f in dataclasses.fields(Expression)])


def _jitter(e: Expression, rng: np.random.Generator, scale: float = 1.0) -> Expression:
    """Per-sample variation: multiplicative on voice scales, additive on face geometry."""
    s = scale
    return dataclasses.replace(
        e,
        pitch=e.pitch * (1 + 0.04 * s * rng.standard_normal()),
        glide=e.glide + 0.04 * s * rng.standard_normal(),
        vibrato=max(0.0, e.vibrato + 0.01 * s * rng.standard_normal()),
        energy=float(np.clip(e.energy * (1 + 0.12 * s * rng.standard_normal()), 0.05, 1.0)),
        tempo=max(1.0, e.tempo * (1 + 0.10 * s * rng.standard_normal())),
        rolloff=max(0.5, e.rolloff + 0.15 * s * rng.standard_normal()),
        breath=max(0.0, e.breath + 0.03 * s * rng.standard_normal()),
        smile=e.smile + 0.12 * s * rng.standard_normal(),
        mouth_open=max(0.0, e.mouth_open + 0.08 * s * rng.standard_normal()),
        skew=e.skew + 0.10 * s * rng.standard_normal(),
        brow_tilt=e.brow_tilt + 0.12 * s * rng.standard_normal(),
        brow_raise=e.brow_raise + 0.12 * s * rng.standard_normal(),
        eye_open=max(0.2, e.eye_open + 0.08 * s * rng.standard_normal()),
    )


@dataclass(frozen=True)
class Take:
    """Everything needed to render one utterance's audio and frames consistently."""

    voice: Expression
    face: Expression
    f0: float                       # speaker base f0, Hz
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    background: tuple[int, int, int]
    env_phase: float                # syllable envelope phase (shared by voice and mouth)
    noise: float


def draw_take(
    label: str,
    rng: np.random.Generator,
    *,
    labels: Sequence[str] = MELD_LABELS,
    f0: float | None = None,
    skin: tuple[int, int, int] | None = None,
    hair: tuple[int, int, int] | None = None,
    intensity: float | None = None,
    noise: float = 0.15,
    ambiguous: tuple[bool, bool] | None = None,
) -> Take:
    """Draw one sample's rendering parameters for `label` (speaker, intensity, ambiguity, jitter).

    `ambiguous` = (voice, face); None draws each with probability `noise`.
    """
    if intensity is None:
        intensity = 1.0 if PROFILE_OF.get(label) == "neutral" else float(rng.uniform(0.55, 1.0))
    true = expression(label, intensity)
    if ambiguous is None:
        ambiguous = (bool(rng.random() < noise), bool(rng.random() < noise))
    others = [x for x in labels if x != label]

    def cue(is_ambiguous: bool) -> Expression:
        if not is_ambiguous or not others:
            return _jitter(true, rng)
        other = others[int(rng.integers(len(others)))]
        return _jitter(mix(true, expression(other), float(rng.uniform(0.5, 1.0))), rng)

    voice, face = cue(ambiguous[0]), cue(ambiguous[1])
    if f0 is None:
        f0 = float(rng.choice([110.0, 210.0]) * rng.uniform(0.88, 1.12))
    if skin is None:
        skin = tuple(int(v) for v in rng.integers([170, 120, 90], [245, 210, 190]))  # type: ignore[assignment]
    if hair is None:
        hair = tuple(int(v) for v in rng.integers(10, 230, size=3))  # type: ignore[assignment]
    background = tuple(int(v) for v in rng.integers(20, 150, size=3))
    return Take(voice, face, f0 * float(rng.uniform(0.95, 1.05)), skin, hair, background,  # type: ignore[arg-type]
                float(rng.uniform(0, 2 * math.pi)), float(noise))


# --------------------------------------------------------------------------- rendering


def _envelope(t: np.ndarray, tempo: float, phase: float) -> np.ndarray:
    """Syllable envelope in [0.08, 1]: raised cosine at `tempo` syllables per second."""
    return 0.08 + 0.92 * (0.5 - 0.5 * np.cos(2 * math.pi * tempo * t + phase)) ** 1.5


_TABLE = 4096  # wavetable length (samples per period of the voiced waveform)


def render_audio(take: Take, sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 waveform in [-1, 1] of `take`'s voice, `seconds` long at `sr` Hz."""
    n = max(0, int(round(seconds * sr)))
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    v = take.voice
    t = np.arange(n) / sr
    rel = t / max(seconds, 1e-6) - 0.5
    f0 = take.f0 * v.pitch * (1 + v.glide * rel) * (1 + v.vibrato * np.sin(2 * math.pi * 6.0 * t + take.env_phase))
    phase = 2 * math.pi * np.cumsum(f0) / sr
    n_harm = int(max(1, min(24, (0.45 * sr) // float(f0.max()))))
    k = np.arange(1, n_harm + 1)
    amps = k ** (-v.rolloff)
    offsets = rng.uniform(0, 2 * math.pi, size=n_harm)
    # One period of the harmonic waveform as a table, read at the running phase: O(samples), not
    # O(samples x harmonics) (the glide/vibrato only move the phase).
    grid = np.arange(_TABLE) * (2 * math.pi / _TABLE)
    table = (amps[:, None] * np.sin(k[:, None] * grid[None, :] + offsets[:, None])).sum(0)
    table /= np.abs(table).max() + 1e-9
    voiced = table[(phase * (_TABLE / (2 * math.pi))).astype(np.int64) % _TABLE]
    breath = rng.standard_normal(n)
    breath = np.convolve(breath, np.ones(4) / 4, mode="same")  # soften the hiss a little
    env = _envelope(t, v.tempo, take.env_phase)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    y = v.energy * 0.8 * env * fade * ((1 - v.breath) * voiced + v.breath * breath)
    y += (0.003 + 0.03 * take.noise) * rng.standard_normal(n)
    return np.clip(y, -1, 1).astype(np.float32)


def render_frames(take: Take, n: int, size: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames [n, size, size, 3] (RGB) of `take`'s face talking at `fps`."""
    if n <= 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    f = take.face
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    X, Y = xx[None], yy[None]                                 # [1, S, S]
    tt = np.arange(n) / fps
    env = _envelope(tt, take.voice.tempo, take.env_phase)
    col = lambda a: np.asarray(a, dtype=np.float32).reshape(-1, 1, 1)  # noqa: E731 - per-frame column
    drift = np.cumsum(rng.normal(0, 0.006, size=(n, 2)), axis=0)
    cx = col(0.5 + rng.normal(0, 0.03) + drift[:, 0])
    cy = col(0.53 + rng.normal(0, 0.03) + drift[:, 1])
    scale = float(rng.uniform(0.92, 1.08))
    rx, ry = 0.30 * scale, 0.38 * scale
    img = np.empty((n, size, size, 3), dtype=np.float32)
    img[:] = np.asarray(take.background, dtype=np.float32)

    def paint(mask: np.ndarray, rgb: Sequence[float]) -> None:
        img[mask] = np.asarray(rgb, dtype=np.float32)

    paint(((X - cx) / (rx * 1.08)) ** 2 + ((Y - cy + 0.03) / (ry * 1.06)) ** 2 <= 1, take.hair)
    face = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1
    paint(face & (Y > cy - 0.7 * ry), take.skin)
    # eyes: height follows eye_open, with an occasional blink
    blink = np.ones(n, dtype=np.float32)
    if n > 4 and rng.random() < 0.3:
        blink[int(rng.integers(n))] = 0.15
    eh = col(0.075 * ry * f.eye_open * blink) + 1e-4
    for side in (-1.0, 1.0):
        ex, ey = cx + side * 0.38 * rx, cy - 0.18 * ry
        paint(((X - ex) / (0.14 * rx)) ** 2 + ((Y - ey) / eh) ** 2 <= 1, (25, 25, 35))
        # brow: segment from outer to inner end; tilt raises (+) or lowers (-) the inner end
        base = cy - 0.40 * ry - 0.09 * ry * f.brow_raise
        x_out, x_in = ex + side * 0.18 * rx, ex - side * 0.16 * rx
        y_out, y_in = base, base - 0.10 * ry * f.brow_tilt
        paint(_segment_mask(X, Y, x_out, y_out, x_in, y_in, 0.035), (50, 35, 25))
    # mouth: curve y_c(u) with smile/skew, opening below it that follows the syllable envelope
    mx, my, mw = cx, cy + 0.50 * ry, 0.42 * rx
    u = (X - mx) / mw
    inside = np.abs(u) <= 1
    a = 0.14 * ry
    y_c = my - f.smile * a * (u ** 2 - 0.35) - f.skew * a * u
    opening = col(0.30 * ry * f.mouth_open * (0.35 + 0.65 * env))
    paint(inside & (Y >= y_c) & (Y <= y_c + opening * (1 - u ** 2)), (70, 15, 25))
    paint(inside & (np.abs(Y - y_c) <= 0.022), (150, 40, 50))
    img += rng.normal(0, 3.0 + 12.0 * take.noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _segment_mask(X: np.ndarray, Y: np.ndarray, x0: Any, y0: Any, x1: Any, y1: Any, width: float) -> np.ndarray:
    """Pixels within `width` (unit coords) of the segment (x0, y0)-(x1, y1); endpoints may be per-frame."""
    dx, dy = x1 - x0, y1 - y0
    s = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return (X - x0 - s * dx) ** 2 + (Y - y0 - s * dy) ** 2 <= width * width


def synth_text(label: str, rng: np.random.Generator, *, ambiguous: bool = False, labels: Sequence[str] = MELD_LABELS) -> str:
    """A short transcript: filler words plus 1-2 cue words of `label` (or, if ambiguous, of another class / none)."""
    profile = PROFILE_OF[label]
    if ambiguous:
        others = [PROFILE_OF[x] for x in labels if PROFILE_OF[x] != profile]
        profile = others[int(rng.integers(len(others)))] if rng.random() < 0.5 and others else ""
    words = [FILLER[i] for i in rng.integers(len(FILLER), size=int(rng.integers(2, 8)))]
    if profile:
        for _ in range(int(rng.integers(1, 3))):
            pool = WORDS[profile]
            words.insert(int(rng.integers(len(words) + 1)), pool[int(rng.integers(len(pool)))])
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    mark = PUNCTUATION.get(profile, ".") if profile and rng.random() < 0.5 else "."
    return text + mark


def synth_audio(label: str, rng: np.random.Generator, sr: int = 16000, seconds: float = 1.5, *, noise: float = 0.15) -> np.ndarray:
    """One random speaker saying something in `label`'s voice: float32 mono waveform."""
    return render_audio(draw_take(label, rng, noise=noise), sr, seconds, rng)


def synth_frames(label: str, rng: np.random.Generator, n: int = 15, size: int = 64, *, fps: float = 10.0, noise: float = 0.15) -> np.ndarray:
    """A random face showing `label` for `n` frames: uint8 [n, size, size, 3]."""
    return render_frames(draw_take(label, rng, noise=noise), n, size, fps, rng)


# --------------------------------------------------------------------------- file writers


def write_mp4(
    path: str | Path,
    frames: np.ndarray | None,
    fps: float = 10.0,
    audio: np.ndarray | None = None,
    sr: int = 16000,
    *,
    crf: int = 23,
    audio_bitrate: int = 64000,
) -> Path:
    """Write an mp4: H.264 video from uint8 RGB `frames` [T, H, W, 3] and/or AAC mono `audio` (float in [-1, 1]).

    `frames=None` writes an audio-only mp4, `audio=None` a video-only one. Odd inputs are
    written as given (one frame, a few audio samples, ...) so tests can make awkward media;
    zero audio samples give a file without an audio track (the mp4 muxer drops empty tracks),
    `np.zeros(n)` a silent track.
    Deterministic: single-threaded x264, bitexact flags, no creation time.
    """
    import av

    path = Path(path)
    if frames is None and audio is None:
        raise ValueError(f"{path}: write_mp4 needs frames, audio, or both")
    if frames is not None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"{path}: H.264 yuv420p needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        vstream = astream = None
        if frames is not None:
            vstream = out.add_stream("libx264", rate=_fraction(fps), options={
                "preset": "ultrafast", "crf": str(crf), "threads": "1",
                "x264-params": "threads=1:lookahead-threads=1",
            })
            vstream.width, vstream.height = int(frames.shape[2]), int(frames.shape[1])
            vstream.pix_fmt = "yuv420p"
            vstream.codec_context.flags |= av.codec.context.Flags.bitexact
        if audio is not None:
            # "fast" coder: ~3x cheaper than the default two-loop search, plenty for synthetic speech
            astream = out.add_stream("aac", rate=int(sr), options={"aac_coder": "fast"})
            astream.layout = "mono"
            astream.bit_rate = int(audio_bitrate)
            astream.codec_context.flags |= av.codec.context.Flags.bitexact
        if vstream is not None:
            for frame in frames:  # type: ignore[union-attr]
                for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in vstream.encode():
                out.mux(packet)
        if astream is not None:
            samples = np.asarray(audio, dtype=np.float32).reshape(-1)
            hop = 1024
            for start in range(0, len(samples), hop):
                chunk = np.ascontiguousarray(samples[start:start + hop])[None]
                aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                aframe.sample_rate = int(sr)
                aframe.pts = start
                for packet in astream.encode(aframe):
                    out.mux(packet)
            for packet in astream.encode():
                out.mux(packet)
    return path


def _fraction(fps: float) -> Any:
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def write_wav(path: str | Path, audio: np.ndarray, sr: int = 48000) -> Path:
    """Write 16-bit PCM wav; `audio` float in [-1, 1], shape [S] (mono) or [S, C]."""
    path = Path(path)
    a = np.asarray(audio, dtype=np.float32)
    channels = 1 if a.ndim == 1 else int(a.shape[1])
    pcm = (np.clip(a, -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(int(sr))
        w.writeframes(pcm.tobytes())
    return path
