"""Video encoders: normalised frames + frame mask -> tokens + token mask.

    from mmer_dist.models.registry import build_encoder
    enc = build_encoder("video", EncoderConfig(kind="scratch", size="debug"))
    tokens, mask = enc(batch)          # batch["video"] [B, F, 3, H, W], batch["video_mask"] [B, F]

kind=hf: VideoMAE over a clip resampled from the real frames (space-time patch tokens), or any image
model (ViT, DINOv2, ...) per frame (one CLS token per frame); size=debug is a random-init tiny
VideoMAE. kind=scratch: per-frame CNN + temporal transformer, one token per frame, trains on CPU.
`build_video_hf` / `build_video_scratch` are the ("video", "hf" / "scratch") entries of
mmer_dist.models.registry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmer_dist.config import ConfigError, EncoderConfig
from mmer_dist.models.encoders import (SCRATCH_SIZES, Encoder, HFEncoder, TokenTransformer, hf_backbone,
                                       sinusoidal_positions, stub_rows)


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
        run = stub_rows(mask)
        frames = _resize_frames(video[run], self.image_size)
        cls = self.backbone(pixel_values=frames.to(self.backbone.dtype)).last_hidden_state[:, 0]
        tokens = cls.new_zeros(b, f, cls.shape[-1])
        tokens[run] = cls
        return tokens, mask

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"video": torch.zeros(batch_size, 1, 3, self.image_size, self.image_size, device=device),
                "video_mask": torch.zeros(batch_size, 1, dtype=torch.bool, device=device)}


def debug_config(dropout: float = 0.1) -> Any:
    """The random-init size=debug video model: a 2-layer VideoMAE of width 32 (32 px, 4 frames)."""
    from transformers import VideoMAEConfig

    return VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def build_video_hf(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    """kind=hf: VideoMAE, or an image model run per frame (a hub id, a local folder, or random-init debug)."""
    backbone, source = hf_backbone("video", cfg, debug_config)
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
        run = stub_rows(mask)
        per_frame = self.cnn(video[run].to(self.cnn[0].weight.dtype))
        x = per_frame.new_zeros(*mask.shape, self.out_dim)
        x[run] = per_frame
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        return self.transformer(x, run), mask

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"video": torch.zeros(batch_size, 1, 3, 16, 16, device=device),
                "video_mask": torch.zeros(batch_size, 1, dtype=torch.bool, device=device)}


def build_video_scratch(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    """kind=scratch: `ScratchVideoEncoder` at cfg.size (no pretrained weights)."""
    if cfg.pretrained:
        raise ConfigError(f"model.video.kind=scratch trains from scratch; model.video.pretrained={cfg.pretrained!r} "
                          f"needs model.video.kind=hf")
    return ScratchVideoEncoder(cfg)

