"""Which module builds which encoder: (modality, kind) -> builder, and `build_encoder`.

    modality  hf                         scratch                      cached
    text      text.build_text_hf         -                            cached.build_cached
    audio     audio.build_audio_hf       audio.build_audio_scratch    cached.build_cached
    video     video.build_video_hf       video.build_video_scratch    cached.build_cached

    enc = build_encoder("audio", EncoderConfig(kind="scratch"), sample_rate=16000)
    tokens, mask = enc(batch)

A new kind is a builder `(cfg: EncoderConfig, sample_rate: int) -> Encoder` in its own module plus
one entry below.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from mmer_dist.config import MODALITIES, ConfigError, EncoderConfig
from mmer_dist.models import audio, cached, text, video
from mmer_dist.models.encoders import Encoder

ENCODERS: dict[tuple[str, str], Callable[[EncoderConfig, int], Encoder]] = {
    ("text", "hf"): text.build_text_hf,
    ("audio", "hf"): audio.build_audio_hf,
    ("audio", "scratch"): audio.build_audio_scratch,
    ("video", "hf"): video.build_video_hf,
    ("video", "scratch"): video.build_video_scratch,
    **{(m, "cached"): partial(cached.build_cached, m) for m in MODALITIES},
}


def build_encoder(modality: str, cfg: EncoderConfig, sample_rate: int = 16000) -> Encoder:
    """The encoder for `modality` described by `cfg`, with `cfg.freeze` applied."""
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    builder = ENCODERS.get((modality, cfg.kind))
    if builder is None:
        kinds = sorted(k for m, k in ENCODERS if m == modality)
        raise ConfigError(f"model.{modality}.kind={cfg.kind!r} is not available for {modality}; "
                          f"choose one of {', '.join(kinds)}")
    encoder = builder(cfg, sample_rate)
    if cfg.freeze:
        encoder.set_frozen(True)
    return encoder
