"""Decoding of shard members: audio formats and rates, the mp4 audio track, video frames, text, failures."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import WordTokenizer
from mmer_dist.config import DataConfig
from mmer_dist.corpora.synthetic_media import write_mp4
from mmer_dist.predict import decode_files
from mmer_dist.data.decode import (IMAGENET_MEAN, IMAGENET_STD, Decoder, DecodeError, crop_window, decode_audio,
                                   decode_sample, decode_text, decode_video)

CFG = DataConfig(sample_rate=16000, max_audio_seconds=1.0, video_frames=4, video_size=32, max_text_tokens=8)


def tone(sr: int, seconds: float, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def sf_bytes(audio: np.ndarray, sr: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt)
    return buf.getvalue()


def mp4_bytes(tmp_path, frames: np.ndarray | None, audio: np.ndarray | None = None, sr: int = 16000, name="v.mp4") -> bytes:
    return write_mp4(tmp_path / name, frames, fps=10.0, audio=audio, sr=sr).read_bytes()


def colour_frames(n: int, size: int = 48) -> np.ndarray:
    """Frame i is a flat grey of level 20 + 20 i, so the picked frame index is readable back."""
    return np.stack([np.full((size, size, 3), 20 + 20 * i, dtype=np.uint8) for i in range(n)])


def meta(label_id: int = 2) -> bytes:
    return json.dumps({"label": "x", "label_id": label_id}).encode()


def test_flac_and_wav_decode_to_mono_16k():
    for fmt in ("FLAC", "WAV"):
        data = sf_bytes(tone(16000, 0.5), 16000, fmt)
        wave = decode_audio(data, fmt.lower(), 16000, 1.0, train=False, rng=None)
        assert wave.dtype == torch.float32 and wave.shape == (8000,)
        assert torch.allclose(wave, torch.from_numpy(tone(16000, 0.5)), atol=1e-3)


def test_stereo_48k_is_downmixed_and_resampled():
    left = tone(48000, 0.5, 440.0)
    stereo = np.stack([left, -left * 0 + left], axis=1)       # identical channels -> mono equals either
    wave = decode_audio(sf_bytes(stereo, 48000, "WAV"), "wav", 16000, 1.0, train=False, rng=None)
    assert wave.shape == (8000,)
    ref = tone(16000, 0.5, 440.0)
    assert float(torch.mean((wave[100:-100] - torch.from_numpy(ref)[100:-100]).abs())) < 0.01
    # opposite-phase channels cancel: it is a mean, not a channel pick
    anti = np.stack([left, -left], axis=1)
    assert decode_audio(sf_bytes(anti, 48000, "WAV"), "wav", 16000, 1.0, False, None).abs().max() < 1e-3


def test_mp4_audio_track_and_mp3(tmp_path):
    audio = tone(16000, 0.8)
    data = mp4_bytes(tmp_path, None, audio, 16000)
    wave = decode_audio(data, "mp4", 16000, 2.0, train=False, rng=None)
    assert abs(wave.shape[0] - 12800) < 2048               # AAC priming/padding adds < 1 frame
    assert 0.2 < float(wave.abs().max()) < 0.7
    # video-only mp4: no audio stream -> None (the modality is absent), not an error
    assert decode_audio(mp4_bytes(tmp_path, colour_frames(3), None, name="v2.mp4"), "mp4", 16000, 1.0, False, None) is None
    mp3 = sf_bytes(tone(44100, 0.5), 44100, "MP3")
    w3 = decode_audio(mp3, "mp3", 16000, 1.0, train=False, rng=None)
    assert abs(w3.shape[0] - 8000) < 1600


def test_crop_random_in_train_centre_in_eval_and_deterministic():
    data = sf_bytes(np.linspace(-1, 1, 48000, dtype=np.float32) * 0.9, 16000, "WAV")   # 3 s ramp
    eval_wave = decode_audio(data, "wav", 16000, 1.0, train=False, rng=None)
    assert eval_wave.shape == (16000,)
    assert abs(float(eval_wave.mean())) < 0.01               # centre of a symmetric ramp
    a = decode_audio(data, "wav", 16000, 1.0, train=True, rng=np.random.default_rng(5))
    b = decode_audio(data, "wav", 16000, 1.0, train=True, rng=np.random.default_rng(5))
    c = decode_audio(data, "wav", 16000, 1.0, train=True, rng=np.random.default_rng(6))
    assert a.shape == (16000,) and torch.equal(a, b) and not torch.equal(a, c)
    assert crop_window(10, 20, True, None) == (0, 10)        # shorter: untouched, no padding
    with pytest.raises(ValueError, match="rng"):
        crop_window(30, 20, True, None)


def test_zero_length_audio_is_absent_not_an_error():
    data = sf_bytes(np.zeros(0, dtype=np.float32), 16000, "WAV")
    out = decode_sample({"json": meta(), "wav": data}, DataConfig(modalities=("audio",)), None, False, None, key="z")
    assert out["audio"] is None and out["degraded"] == ["audio_empty"] and out["label"] == 2


def test_video_frames_uniform_resized_normalised(tmp_path):
    data = mp4_bytes(tmp_path, colour_frames(10))
    video = decode_video(data, frames=4, size=32)
    assert video.shape == (4, 3, 32, 32) and video.dtype == torch.float32
    # undo the normalisation: frames 0, 3, 6, 9 of a 10-frame clip (grey 20, 80, 140, 200)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    grey = ((video * std + mean) * 255).mean(dim=(1, 2, 3))
    assert torch.allclose(grey, torch.tensor([20.0, 80.0, 140.0, 200.0]), atol=6)


def test_one_frame_video_repeats_its_frame(tmp_path):
    video = decode_video(mp4_bytes(tmp_path, colour_frames(1)), frames=4, size=32)
    assert video.shape == (4, 3, 32, 32)
    assert all(torch.equal(video[0], video[i]) for i in range(4))


def test_video_with_silent_audio_track(tmp_path):
    data = mp4_bytes(tmp_path, colour_frames(5), np.zeros(8000, dtype=np.float32), 16000)
    out = decode_sample({"json": meta(), "mp4": data}, CFG, WordTokenizer(), train=False, rng=None, key="s")
    assert out["video"].shape == (4, 3, 32, 32)
    assert out["audio"] is not None and float(out["audio"].abs().max()) < 1e-3


def test_corrupt_members_raise_decode_error_with_reason(tmp_path):
    good = mp4_bytes(tmp_path, colour_frames(5))
    cases = {
        "video_corrupt": {"json": meta(), "mp4": good[: len(good) // 3]},
        "audio_corrupt": {"json": meta(), "flac": b"fLaC" + b"\x00" * 50},
        "meta_corrupt": {"json": b"{not json", "txt": b"hi"},
        "meta_missing": {"txt": b"hi"},
        "text_corrupt": {"json": meta(), "txt": b"\xff\xfe\xfa"},
    }
    for reason, members in cases.items():
        with pytest.raises(DecodeError) as e:
            decode_sample(members, CFG, WordTokenizer(), train=False, rng=None, key="bad")
        assert e.value.reason == reason, (reason, e.value)
        assert "bad" in str(e.value)


def test_dialogue_context_follows_the_utterance_and_keeps_the_latest_turn():
    from mmer_dist.config import EncoderConfig
    from mmer_dist.models import build_tokenizer

    tok = build_tokenizer(EncoderConfig(kind="hf", pretrained="minilm", size="small"))   # packaged, offline
    context = [{"speaker": "Ross", "text": "we were on a break"}, {"speaker": "Rachel", "text": "no we were not"}]
    alone = decode_text("you cheated", tok, 64).tolist()
    ids = decode_text("you cheated", tok, 64, context=context).tolist()
    assert ids[: len(alone)] == alone and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[len(alone): -1]) == "ross : we were on a break rachel : no we were not"
    short = decode_text("you cheated", tok, len(alone) + 4, context=context).tolist()
    assert len(short) == len(alone) + 4 and tok.decode(short[len(alone): -1]) == "we were not"  # oldest cut first
    assert decode_text("you cheated", tok, len(alone), context=context).tolist() == alone      # no room: no context
    # decode_sample takes the last data.text_context turns from the sample's metadata
    cfg = DataConfig(modalities=("text",), max_text_tokens=64, text_context=1)
    member = json.dumps({"label_id": 1, "corpus": "meld", "meta": {"context": context}}).encode()
    out = decode_sample({"json": member, "txt": b"you cheated"}, cfg, tok, False, None)
    assert tok.decode(out["text_ids"][len(alone): -1].tolist()) == "rachel : no we were not"
    # MELD shards packed without context are an error naming the fix; other corpora have no dialogues
    with pytest.raises(DecodeError, match="repack") as e:
        decode_sample({"json": json.dumps({"label_id": 1, "corpus": "meld", "meta": {}}).encode(), "txt": b"hi"},
                      cfg, tok, False, None)
    assert e.value.reason == "context_missing"
    ravdess = json.dumps({"label_id": 1, "corpus": "ravdess", "meta": {}}).encode()
    assert decode_sample({"json": ravdess, "txt": b"you cheated"}, cfg, tok, False, None)["text_ids"].tolist() == alone
    # `mmer-dist predict --context 'Speaker: words'` goes through the same path
    raw = decode_files(text="you cheated", cfg_data=cfg, tokenizer=tok,
                       context=["Ross: we were on a break", "Rachel: no we were not"])
    assert torch.equal(raw["text_ids"], out["text_ids"])


def test_missing_modalities_are_none_and_unrequested_are_absent():
    out = decode_sample({"json": meta(4), "txt": b"hello there"}, CFG, WordTokenizer(), False, None, key="t")
    assert out["audio"] is None and out["video"] is None and out["label"] == 4
    assert out["text_ids"].tolist()[0] == 1 and out["text_ids"].tolist()[-1] == 2
    text_only = DataConfig(modalities=("text",), max_text_tokens=4)
    out = decode_sample({"json": meta(), "txt": b"a b c d e f g", "flac": b"junk"}, text_only, WordTokenizer(), False, None)
    assert set(out) == {"key", "label", "degraded", "text_ids"}    # the junk flac is never decoded
    assert len(out["text_ids"]) == 4                               # truncated to max_text_tokens


def test_decoder_is_deterministic_per_index_and_epoch():
    data = sf_bytes(tone(16000, 3.0, 300.0) * np.linspace(0, 1, 48000, dtype=np.float32), 16000, "FLAC")
    members = {"json": meta(), "flac": data}
    cfg = DataConfig(modalities=("audio",), max_audio_seconds=0.5)
    d = Decoder(cfg, None, train=True, seed=1)
    a, b, c = d(members, index=7)["audio"], d(members, index=7)["audio"], d(members, index=8)["audio"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, d(members, index=7, epoch=1)["audio"])
    with pytest.raises(ValueError, match="tokenizer"):
        Decoder(CFG, None, train=False)


def test_decode_files_same_path_as_training(tmp_path):
    frames, audio = colour_frames(6), tone(16000, 0.6)
    mp4 = write_mp4(tmp_path / "clip.mp4", frames, fps=10.0, audio=audio, sr=16000)
    wav = tmp_path / "a.wav"
    sf.write(wav, tone(48000, 0.6), 48000)
    out = decode_files(video=mp4, audio=wav, text="so happy", cfg_data=CFG, tokenizer=WordTokenizer())
    shard_like = decode_sample({"json": meta(), "mp4": mp4.read_bytes(), "wav": wav.read_bytes(), "txt": b"so happy"},
                               CFG, WordTokenizer(), train=False, rng=None)
    assert out["label"] == -1
    for m in ("audio", "video", "text_ids"):
        assert torch.equal(out[m], shard_like[m]), m
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        decode_files(video=tmp_path / "nope.mp4", cfg_data=CFG, tokenizer=WordTokenizer())
    with pytest.raises(ValueError, match="at least one"):
        decode_files(cfg_data=CFG, tokenizer=WordTokenizer())
