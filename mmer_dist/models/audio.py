"""Audio encoders: mono waveform + sample mask -> frame tokens + frame mask.

    from mmer_dist.models.registry import build_encoder
    enc = build_encoder("audio", EncoderConfig(kind="scratch", size="debug"), sample_rate=16000)
    tokens, mask = enc(batch)          # batch["audio"], batch["audio_mask"] -> [B, T, D], [B, T]

kind=hf: wav2vec2 / HuBERT / WavLM through `transformers` (~20 ms frames; size=debug is a random-init
tiny Wav2Vec2). kind=scratch: log-mel + 2 strided convs + transformer (40 ms tokens), trains on CPU.
`build_audio_hf` / `build_audio_scratch` are the ("audio", "hf" / "scratch") entries of
mmer_dist.models.registry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmer_dist.config import ConfigError, EncoderConfig
from mmer_dist.models.encoders import (SCRATCH_SIZES, Encoder, HFEncoder, TokenTransformer, hf_backbone,
                                       lengths_to_mask, sinusoidal_positions)


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


def debug_config(dropout: float = 0.1) -> Any:
    """The random-init size=debug audio model: a 2-layer Wav2Vec2 of width 32 (layer-norm feature extractor)."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(32, 32, 32), conv_kernel=(10, 8, 4), conv_stride=(5, 4, 4),
                          feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4, mask_time_prob=0.0, layerdrop=0.0,
                          vocab_size=4, hidden_dropout=dropout, attention_dropout=dropout,
                          activation_dropout=dropout, feat_proj_dropout=dropout)


def build_audio_hf(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    """kind=hf: a wav2vec2/HuBERT/WavLM-style model (a hub id, a local folder, or random-init debug); 16 kHz only."""
    if sample_rate != 16000:
        raise ConfigError(f"hf audio encoders expect 16 kHz input, got model.sample_rate={sample_rate}; "
                          f"set data.sample_rate=16000 (or use model.audio.kind=scratch)")
    # SpecAugment and LayerDrop off (see HFAudioEncoder)
    backbone, source = hf_backbone("audio", cfg, debug_config, mask_time_prob=0.0, mask_feature_prob=0.0,
                                   layerdrop=0.0)
    if not hasattr(backbone, "_get_feat_extract_output_lengths"):
        raise ConfigError(f"model.audio.pretrained={source!r} is a {type(backbone).__name__}, not a "
                          f"wav2vec2/HuBERT/WavLM-style speech encoder")
    return HFAudioEncoder(cfg, backbone, source)


def spec_augment(feats: Tensor, frames: Tensor, masks: int = 2, max_bands: int = 8, max_frames: int = 20) -> Tensor:
    """SpecAugment (Park et al. 2019) without time warping, on normalised log-mel feats [B, n_mels, T].

    Per row: `masks` frequency masks of 0..max_bands mel bands and `masks` time masks of 0..max_frames
    frames, placed uniformly inside the row's `frames` real frames, set to 0 (the utterance mean).
    """
    b, n_mels, t = feats.shape
    dev = feats.device
    band, step = torch.arange(n_mels, device=dev)[None, :, None], torch.arange(t, device=dev)[None, None, :]
    hidden = torch.zeros_like(feats, dtype=torch.bool)
    for _ in range(masks):
        width = torch.randint(0, max_bands + 1, (b, 1, 1), device=dev)
        start = (torch.rand(b, 1, 1, device=dev) * (n_mels - width + 1)).long()
        hidden |= (band >= start) & (band < start + width)
        width = torch.minimum(torch.randint(0, max_frames + 1, (b, 1, 1), device=dev), frames.view(b, 1, 1))
        start = (torch.rand(b, 1, 1, device=dev) * (frames.view(b, 1, 1) - width + 1)).long()
        hidden |= (step >= start) & (step < start + width)
    return feats.masked_fill(hidden, 0.0)


class ScratchAudioEncoder(Encoder):
    """Log-mel (25 ms window, 10 ms hop) -> 2 strided convs (40 ms tokens) -> LayerNorm -> transformer.

    Trains on CPU. Frames are computed without centering, so a frame is real only when its whole window
    lies in the real samples; features are normalised per utterance over real frames and padded frames
    are zeroed before every convolution, so padding never reaches a real token. The LayerNorm puts the
    conv output on a fixed scale beside the unit-amplitude sinusoidal positions; without it, and with a
    per-band feature normalisation, the model sat at chance for its first ~150 steps on RAVDESS.
    `cfg.spec_augment` masks frequency bands and time spans in training (`spec_augment`).
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
        self.conv_norm = nn.LayerNorm(dim)
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
            # One mean and variance per utterance over all bands and real frames: a per-band
            # normalisation would erase the long-term spectral envelope (tilt, upper-band energy), an
            # emotion cue. On RAVDESS (held-out actors) this trained faster with the same dev accuracy.
            n = fmask.sum((1, 2), keepdim=True).clamp(min=1.0) * feats.shape[1]
            mean = (feats * fmask).sum((1, 2), keepdim=True) / n
            std = torch.sqrt((((feats - mean) * fmask) ** 2).sum((1, 2), keepdim=True) / n + 1e-5)
            feats = (feats - mean) / std * fmask
            if self.cfg.spec_augment and self.training:
                feats = spec_augment(feats, self._frames(lengths))
        x = feats.to(self.conv1.weight.dtype)
        run1 = self._half(self._frames(run_lengths))
        x = F.gelu(self.conv1(x)) * lengths_to_mask(run1, (x.shape[2] - 1) // 2 + 1)[:, None, :].to(x.dtype)
        run2 = self._half(run1)
        x = F.gelu(self.conv2(x))
        run_mask = lengths_to_mask(run2, x.shape[2])
        x = self.conv_norm(x.transpose(1, 2)) * run_mask[..., None].to(x.dtype)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        tokens = self.transformer(x, run_mask)
        return tokens, lengths_to_mask(self._half(self._half(self._frames(lengths))), x.shape[1])

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"audio": torch.zeros(batch_size, self.n_fft, device=device),
                "audio_mask": torch.zeros(batch_size, self.n_fft, dtype=torch.bool, device=device)}


def build_audio_scratch(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    """kind=scratch: `ScratchAudioEncoder` at cfg.size (no pretrained weights)."""
    if cfg.pretrained:
        raise ConfigError(f"model.audio.kind=scratch trains from scratch; model.audio.pretrained={cfg.pretrained!r} "
                          f"needs model.audio.kind=hf")
    return ScratchAudioEncoder(cfg, sample_rate)

