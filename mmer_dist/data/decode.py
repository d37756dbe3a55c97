"""Decode one sample's shard members (bytes) into model-ready tensors.

Runs inside DataLoader workers, after the shuffle. One function does the work for training,
evaluation and `mmer-dist predict` (mmer_dist.predict.decode_files), so a raw file is decoded exactly
like a packed one:

    decoder = Decoder(cfg.data, tokenizer, train=True, seed=0)
    sample = decoder({"__key__": "k", "json": b"{...}", "txt": b"hi", "flac": b"...", "mp4": b"..."})
    # {"key": "k", "label": 3, "text_ids": LongTensor[Lt] | None, "audio": FloatTensor[S] | None,
    #  "video": FloatTensor[F, 3, H, W] | None, "degraded": [...]}
    # raw files (mmer-dist predict) go through the same decode_sample: mmer_dist.predict.decode_files

Per modality (only those in `cfg.data.modalities`; a modality outside it is never decoded):

* audio: FLAC/WAV/OGG via soundfile, anything else (mp3, m4a, the audio track of an mp4) via
  PyAV. Stereo is downmixed to mono, the rate converted with `torchaudio.functional.resample`
  (never `torchaudio.load`: it needs torchcodec + system FFmpeg), then cropped to
  `max_audio_seconds` -- a random window in training, the centre window in evaluation, both
  deterministic given the rng. Shorter audio is returned unpadded (the collate pads + masks).
  Without an audio member the audio track of the video member is used when it has one.
* video: PyAV from bytes; `video_frames` frames at indices spread uniformly over the clip
  (a one-frame clip repeats its frame), resized (no crop, aspect not kept) to
  `video_size` x `video_size` by swscale, float in [0, 1] normalised with the ImageNet
  mean/std, shape [F, 3, H, W]. The codec runs single-threaded: the DataLoader workers are
  the parallelism.
* text: the text encoder's tokenizer, truncated to `max_text_tokens` (special tokens kept).
* embedding shards (`mmer-dist embed`): KEY.emb.{modality}.npy -> `{modality}_emb`, float16
  [T, D] (T = 1 for a pooled vector); no media is decoded and the tokenizer is not used.

Failure policy. A member that is present but cannot be decoded raises `DecodeError(reason)`;
the pipeline catches it, skips the sample and counts it per reason (never a worker crash).
A member that decodes to nothing -- zero-length audio, a video without frames, an empty
transcript -- is not an error: that modality is simply absent (all-False mask after collation)
and the sample carries the reason in `sample["degraded"]` so the loop can count it too.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mmer_dist.config import DataConfig
from mmer_dist.shards.schema import AUDIO_EXTS, EMBED_EXT_PREFIX, META_EXT, TEXT_EXT, VIDEO_EXTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# soundfile (libsndfile) handles these directly and fast; everything else goes through PyAV.
SOUNDFILE_EXTS = ("flac", "wav", "ogg")

NO_TOKENIZER = ("text is in data.modalities but no tokenizer was given "
                "(pass mmer_dist.models.encoders.build_tokenizer(cfg.model.text))")


@dataclass(frozen=True)
class Skipped:
    """Marker the pipeline yields instead of a sample that failed to decode; the collate counts it."""

    key: str
    reason: str
    detail: str = ""
    pad: bool = False          # an eval padding duplicate: not counted (its original is)
    fatal: bool = False        # not a bad input but damaged data the index calls complete: the run must stop
    index: int = -1            # the sample's position in its split, when known

    @classmethod
    def from_error(cls, e: "DecodeError", pad: bool = False, index: int = -1, where: str = "") -> "Skipped":
        return cls(e.key, e.reason, f"{where}: {e.detail}" if where else e.detail, pad, index=index)


class DecodeError(Exception):
    """A present member could not be decoded. `reason` is the counter key (e.g. `audio_corrupt`)."""

    def __init__(self, reason: str, key: str = "", detail: str = "") -> None:
        self.reason = reason
        self.key = key
        self.detail = detail
        super().__init__(f"sample {key or '?'}: {reason}: {detail}")


# --------------------------------------------------------------------------- audio


def _read_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)   # [N, C]
    return np.ascontiguousarray(wave.T), int(sr)


def _read_pyav(data: bytes) -> tuple[np.ndarray, int] | None:
    """All audio of the first audio stream as float32 [C, N]; None when there is no audio stream."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        streams = container.streams.audio
        if not streams:
            return None
        stream = streams[0]
        # fltp keeps the input rate and layout; downmix and resampling happen in torch below
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        rate = stream.rate or stream.codec_context.sample_rate
        for frame in container.decode(stream):
            rate = frame.sample_rate or rate
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), int(rate or 0)
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), int(rate)


def read_audio(data: bytes, ext: str) -> tuple[np.ndarray, int] | None:
    """Bytes -> (float32 [channels, samples], rate); None when a container has no audio stream."""
    if ext in SOUNDFILE_EXTS:
        try:
            return _read_soundfile(data)
        except Exception:   # e.g. a FLAC variant libsndfile rejects: PyAV is the general fallback
            pass
    return _read_pyav(data)


def crop_window(length: int, max_len: int, train: bool, rng: np.random.Generator | None) -> tuple[int, int]:
    """[start, end) of the kept window: random in training (needs rng), centred in evaluation."""
    if length <= max_len:
        return 0, length
    slack = length - max_len
    if train:
        if rng is None:
            raise ValueError("crop_window(train=True) needs an rng (np.random.Generator) for a reproducible crop")
        start = int(rng.integers(0, slack + 1))
    else:
        start = slack // 2
    return start, start + max_len


def decode_audio(data: bytes, ext: str, sample_rate: int, max_seconds: float, train: bool,
                 rng: np.random.Generator | None, key: str = "") -> torch.Tensor | None:
    """Audio bytes -> mono float32 waveform [S] at `sample_rate`, S <= max_seconds x rate.

    Returns None when the bytes hold no audio stream; a zero-length tensor when the stream is
    empty. Raises DecodeError("audio_corrupt") when the bytes cannot be decoded.
    """
    import torchaudio.functional as AF

    try:
        read = read_audio(data, ext)
    except Exception as e:  # any codec/container error of a present member
        raise DecodeError("audio_corrupt", key, f"{ext}: {type(e).__name__}: {e}") from e
    if read is None:
        return None
    wave, sr = read
    if wave.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float32)
    if sr <= 0:
        raise DecodeError("audio_corrupt", key, f"{ext}: sample rate {sr}")
    mono = wave.mean(axis=0) if wave.shape[0] > 1 else wave[0]
    # crop at the source rate first (resampling only what is kept), then resample and trim
    max_len = int(round(max_seconds * sample_rate))
    max_src = int(math.ceil(max_seconds * sr))
    start, end = crop_window(mono.shape[0], max_src, train, rng)
    out = torch.from_numpy(np.ascontiguousarray(mono[start:end], dtype=np.float32))
    if sr != sample_rate:
        out = AF.resample(out, sr, sample_rate)
    return out[:max_len].contiguous()


# --------------------------------------------------------------------------- video


def _frame_targets(n: int, frames: int) -> np.ndarray:
    """Indices of `frames` frames spread uniformly over n frames (repeats when n < frames)."""
    return np.linspace(0, max(n - 1, 0), frames).round().astype(np.int64)


def decode_video(data: bytes, frames: int, size: int, key: str = "") -> torch.Tensor | None:
    """Video bytes -> float32 [frames, 3, size, size], ImageNet-normalised.

    Returns None when the container has no video stream or no frame decodes (the modality is
    then absent); raises DecodeError("video_corrupt") when the bytes cannot be decoded.
    """
    import av

    def small(frame: Any) -> np.ndarray:
        return frame.reformat(width=size, height=size, format="rgb24").to_ndarray()

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            declared = int(stream.frames or 0)
            picked: list[np.ndarray] = []
            if declared > 0:
                # decode in order, convert only the frames we keep, stop after the last one
                targets = _frame_targets(declared, frames)
                wanted = set(targets.tolist())
                kept: dict[int, np.ndarray] = {}
                last_frame, last_i = None, -1
                for i, frame in enumerate(container.decode(stream)):
                    last_frame, last_i = frame, i
                    if i in wanted:
                        kept[i] = small(frame)
                    if i >= targets[-1]:
                        break
                if last_frame is None:
                    return None
                if len(kept) < len(wanted):   # the container declared more frames than it holds
                    actual = last_i + 1
                    kept_all = {**kept, last_i: kept.get(last_i, small(last_frame))}
                    targets = np.minimum(targets, actual - 1)
                    picked = [kept_all[t] if t in kept_all else kept_all[max(k for k in kept_all if k <= t)]
                              for t in targets.tolist()]
                else:
                    picked = [kept[t] for t in targets.tolist()]
            else:
                # frame count unknown: convert every frame (small after reformat), then pick
                allf = [small(f) for f in container.decode(stream)]
                if not allf:
                    return None
                picked = [allf[t] for t in _frame_targets(len(allf), frames).tolist()]
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("video_corrupt", key, f"{type(e).__name__}: {e}") from e
    arr = torch.from_numpy(np.stack(picked))                      # [F, H, W, 3] uint8
    video = arr.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((video - mean) / std).contiguous()


# --------------------------------------------------------------------------- text


def decode_text(data: bytes | str, tokenizer: Callable[..., Any], max_tokens: int, key: str = "",
                context: list[dict[str, str]] | None = None) -> torch.Tensor | None:
    """UTF-8 transcript -> LongTensor [<= max_tokens] of token ids; None for an empty transcript.

    With `context` (earlier turns, oldest first, {"speaker", "text"}): the utterance's ids, then the
    turns as "Speaker: text ..." and a separator in the room left, keeping the most recent tokens.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else str(data)
    except UnicodeDecodeError as e:
        raise DecodeError("text_corrupt", key, f"not UTF-8: {e}") from e
    text = text.strip()
    if not text:
        return None
    try:
        ids = list(tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"])[:max_tokens]
        room = max_tokens - len(ids) - 1          # one separator closes the context
        if context and room > 0:
            turns = " ".join(f"{t['speaker']}: {t['text']}" if t.get("speaker") else t["text"] for t in context)
            ctx = list(tokenizer(turns, add_special_tokens=False)["input_ids"])[-room:]
            ids += ctx + [tokenizer.sep_token_id]
    except Exception as e:
        raise DecodeError("text_corrupt", key, f"tokenizer: {type(e).__name__}: {e}") from e
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- embeddings (mmer-dist embed)


def embedding_ext(modality: str) -> str:
    """Member extension of a modality's features in embedding shards: `emb.text.npy` (KEY.emb.text.npy)."""
    return f"{EMBED_EXT_PREFIX}{modality}.npy"


def is_embedding_sample(members: dict[str, Any]) -> bool:
    """True for a sample of embedding shards (it has at least one KEY.emb.*.npy member)."""
    return any(str(k).startswith(EMBED_EXT_PREFIX) for k in members)


def decode_embedding(data: bytes, key: str = "", modality: str = "") -> torch.Tensor:
    """`.npy` bytes (float16 [D] pooled or [T, D] tokens) -> float16 tensor [T, D] (T = 1 when pooled)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise DecodeError("embedding_corrupt", key, f"{key}.{embedding_ext(modality)}: {type(e).__name__}: {e}") from e
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise DecodeError("embedding_corrupt", key, f"{key}.{embedding_ext(modality)}: expected float [D] or [T, D], "
                                                    f"got {arr.dtype} {arr.shape}; re-run `mmer-dist embed`")
    return torch.from_numpy(np.ascontiguousarray(arr))


def decode_embedding_sample(members: dict[str, Any], modalities: tuple[str, ...], out: dict[str, Any]) -> dict[str, Any]:
    """Fill `out` (key/label already set) with `{m}_emb` per modality: [T, D] float16, None when absent."""
    for m in modalities:
        data = members.get(embedding_ext(m))
        out[f"{m}_emb"] = None if data is None else decode_embedding(data, out["key"], m)
    return out


# --------------------------------------------------------------------------- sample


def _first_ext(members: dict[str, Any], exts: tuple[str, ...]) -> str | None:
    for ext in exts:
        if ext in members and members[ext] is not None:
            return ext
    return None


def _context(meta: dict[str, Any], turns: int, key: str) -> list[dict[str, str]] | None:
    """The last `turns` dialogue turns stored in a sample's metadata (None when turns = 0)."""
    if turns <= 0:
        return None
    corpus_meta = meta.get("meta") or {}
    if "context" not in corpus_meta:
        if meta.get("corpus") == "meld":
            raise DecodeError("context_missing", key, "data.text_context > 0 but this MELD shard has no dialogue "
                                                      "context; repack it with this version of mmer-dist pack")
        return None                               # a corpus without dialogues: the utterance alone
    return list(corpus_meta["context"])[-turns:]


def decode_sample(members: dict[str, Any], cfg_data: DataConfig, tokenizer: Callable[..., Any] | None,
                  train: bool, rng: np.random.Generator | None, key: str | None = None,
                  require_label: bool = True) -> dict[str, Any]:
    """Decode one sample's members (extension -> bytes, as in a WebDataset sample).

    Returns {"key", "label", "text_ids", "audio", "video", "degraded"}; a modality in
    `cfg_data.modalities` the sample lacks (or that decodes to nothing) is None, a modality not
    in it is absent from the dict. Raises DecodeError on a member that cannot be decoded.
    A sample of embedding shards gives {"key", "label", "degraded", "text_emb", ...} instead.
    """
    key = key or str(members.get("__key__", "")) or "?"
    label = -1
    meta: dict[str, Any] = {}
    meta_raw = members.get(META_EXT)
    if meta_raw is None:
        if require_label:
            raise DecodeError("meta_missing", key, f"no {key}.{META_EXT} member: the label is unknown; repack the shard")
    else:
        try:
            meta = json.loads(meta_raw)
            label = int(meta["label_id"])
        except Exception as e:
            raise DecodeError("meta_corrupt", key, f"{key}.{META_EXT}: {type(e).__name__}: {e}") from e
    out: dict[str, Any] = {"key": key, "label": label, "degraded": []}
    mods = cfg_data.modalities
    if is_embedding_sample(members):      # shards written by `mmer-dist embed`: features, no media
        return decode_embedding_sample(members, mods, out)

    if "text" in mods:
        out["text_ids"] = None
        if members.get(TEXT_EXT) is not None:
            if tokenizer is None:
                raise ValueError(NO_TOKENIZER)
            out["text_ids"] = decode_text(members[TEXT_EXT], tokenizer, cfg_data.max_text_tokens, key,
                                          _context(meta, cfg_data.text_context, key))
            if out["text_ids"] is None:
                out["degraded"].append("text_empty")

    video_ext = _first_ext(members, VIDEO_EXTS)
    if "audio" in mods:
        out["audio"] = None
        audio_ext = _first_ext(members, AUDIO_EXTS)
        src_ext = audio_ext or video_ext            # no audio member: the video's audio track
        if src_ext is not None:
            try:
                wave = decode_audio(members[src_ext], src_ext, cfg_data.sample_rate, cfg_data.max_audio_seconds,
                                    train, rng, key)
            except DecodeError as e:
                if audio_ext is None:    # the bad member is the video file: count it as such
                    raise DecodeError("video_corrupt", key, f"audio track: {e.detail}") from e
                raise
            if wave is not None and wave.numel() == 0:
                out["degraded"].append("audio_empty")
                wave = None
            elif wave is None and audio_ext is not None:
                out["degraded"].append("audio_no_stream")
            out["audio"] = wave

    if "video" in mods:
        out["video"] = None
        if video_ext is not None:
            out["video"] = decode_video(members[video_ext], cfg_data.video_frames, cfg_data.video_size, key)
            if out["video"] is None:
                out["degraded"].append("video_empty")
    return out


class Decoder:
    """Picklable decode step for DataLoader workers: `decoder(members, index=i)` -> sample dict.

    The crop rng is derived from (seed, epoch, index), so a sample decodes identically whichever
    worker or rank decodes it; evaluation (train=False) crops the centre and needs no rng.
    """

    def __init__(self, cfg_data: DataConfig, tokenizer: Callable[..., Any] | None, train: bool,
                 seed: int = 0, epoch: int = 0) -> None:
        if "text" in cfg_data.modalities and tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        self.cfg = cfg_data
        self.tokenizer = tokenizer
        self.train = train
        self.seed = seed
        self.epoch = epoch

    def rng(self, index: int | None, epoch: int | None = None) -> np.random.Generator:
        salt = index if index is not None else np.random.SeedSequence().entropy % (2**31)
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.seed, int(epoch), int(salt)])

    def __call__(self, members: dict[str, Any], index: int | None = None, key: str | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        """`index` (e.g. the position in the epoch's draw) and `epoch` (default: the constructor's) seed the crop."""
        rng = self.rng(index, epoch) if self.train else None
        return decode_sample(members, self.cfg, self.tokenizer, self.train, rng, key=key)
