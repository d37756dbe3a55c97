"""Cross-modal fusion and the assembled model: encoders -> one transformer over all tokens -> CLS -> head.

For each present modality the encoder's tokens are pooled down to at most
`fusion.max_tokens_per_modality` (average over consecutive real tokens; padding never counted),
projected to `fusion.width`, given a learned modality-type embedding and (with `fusion.positions`)
a learned position embedding, and concatenated behind a learned CLS token. A transformer with
key-padding masks runs over the sequence; the CLS output goes to the classification head.

A missing modality (an all-False mask row, or the key absent from the batch) contributes no
attendable token; the CLS token is always attendable, so no attention row is ever empty and the
output is finite even with every modality missing. `fusion.modality_dropout` (training only) hides
whole modalities per sample, never all the modalities a sample has.

    model = build_model(cfg.model)
    logits = model(batch)            # [B, num_classes]
    feats = model.encode(batch)      # {modality: (tokens[B, T, D], mask[B, T])}, e.g. for caching
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmer_dist.config import FusionConfig, MODALITIES, ModelConfig
from mmer_dist.models.encoders import Encoder, TokenTransformer
from mmer_dist.models.registry import build_encoder
from mmer_dist.models.heads import ClassificationHead


def pool_tokens(tokens: Tensor, mask: Tensor, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Compact each row's real tokens to the front and average them into at most `max_tokens` bins.

    A row with L real tokens keeps them as they are when L <= max_tokens; otherwise bin k averages
    real tokens [floor(k L / M), floor((k+1) L / M)). The result depends only on the real tokens,
    never on how much padding follows them. Returns tokens [B, min(T, M), D] and their mask.
    """
    b, t, d = tokens.shape
    t_out = min(t, max_tokens)
    m = mask.long()
    n_real = m.sum(1, keepdim=True)
    rank = m.cumsum(1) - 1
    bins = torch.where(n_real > max_tokens, torch.div(rank * max_tokens, n_real.clamp(min=1), rounding_mode="floor"), rank)
    bins = torch.where(mask, bins, torch.full_like(bins, t_out))  # padding goes to a spare bin, dropped below
    values = torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    sums = tokens.new_zeros(b, t_out + 1, d).scatter_add(1, bins[..., None].expand(b, t, d), values)
    counts = tokens.new_zeros(b, t_out + 1).scatter_add(1, bins, mask.to(tokens.dtype))
    sums, counts = sums[:, :t_out], counts[:, :t_out]
    return sums / counts.clamp(min=1.0)[..., None], counts > 0


class CrossModalFusion(nn.Module):
    """{modality: (tokens, mask)} -> pooled CLS vector [B, width]."""

    def __init__(self, cfg: FusionConfig, in_dims: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w)) for m, d in in_dims.items()})
        self.modality_embed = nn.Parameter(torch.randn(len(MODALITIES), w) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_tokens_per_modality, w) * 0.02) if cfg.positions else None
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.transformer = TokenTransformer(w, cfg.layers, cfg.heads, cfg.dropout)

    def modality_dropout_mask(self, present: Tensor) -> Tensor:
        """present [B, M] -> keep [B, M]: each present modality dropped with p, at least one kept per sample."""
        drop = (torch.rand(present.shape, device=present.device) < self.cfg.modality_dropout) & present
        keep = present & ~drop
        lost_all = present.any(1) & ~keep.any(1)
        if bool(lost_all.any()):
            # Restore one present modality, chosen uniformly, for samples that lost all of theirs.
            scores = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
            restore = torch.zeros_like(present).scatter(1, scores.argmax(1, keepdim=True), True)
            keep = keep | (restore & lost_all[:, None])
        return keep

    def forward(self, feats: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        names = [m for m in self.proj if feats.get(m) is not None]
        pooled = [pool_tokens(*feats[m], self.cfg.max_tokens_per_modality) for m in names]
        masks = [mk for _, mk in pooled]
        if self.training and self.cfg.modality_dropout > 0 and names:
            keep = self.modality_dropout_mask(torch.stack([mk.any(1) for mk in masks], dim=1))
            masks = [mk & keep[:, i: i + 1] for i, mk in enumerate(masks)]
        b = next(iter(feats.values()))[0].shape[0] if feats else 1
        seq, seq_mask = [self.cls.expand(b, -1, -1)], [torch.ones(b, 1, dtype=torch.bool, device=self.cls.device)]
        for m, (tokens, _), mask in zip(names, pooled, masks):
            x = self.proj[m](tokens.to(self.cls.dtype)) + self.modality_embed[MODALITIES.index(m)]
            if self.pos_embed is not None:
                x = x + self.pos_embed[: x.shape[1]]
            seq.append(torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device)))
            seq_mask.append(mask)
        out = self.transformer(torch.cat(seq, dim=1), torch.cat(seq_mask, dim=1))
        return out[:, 0]


class MultimodalModel(nn.Module):
    """Encoders for `cfg.modalities` + CrossModalFusion + ClassificationHead. No distributed code."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoders = nn.ModuleDict({m: build_encoder(m, getattr(cfg, m), cfg.sample_rate) for m in cfg.modalities})
        self.fusion = CrossModalFusion(cfg.fusion, {m: e.out_dim for m, e in self.encoders.items()})
        self.head = ClassificationHead(cfg.fusion.width, cfg.num_classes, cfg.fusion.dropout)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW must not decay besides biases and norms (embeddings of the fusion)."""
        return {"fusion.modality_embed", "fusion.pos_embed", "fusion.cls"}

    def encode(self, batch: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
        """Run every encoder; a modality missing from the batch comes back as an all-False mask."""
        b = _batch_size(batch)
        encoders: dict[str, Encoder] = dict(self.encoders.items())  # type: ignore[arg-type]
        return {m: enc(batch, batch_size=b) for m, enc in encoders.items()}

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.head(self.fusion(self.encode(batch)))


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("labels", "text_ids", "audio", "video"):
        if key in batch:
            return int(batch[key].shape[0])
    for value in batch.values():
        if isinstance(value, Tensor):
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    raise ValueError("cannot tell the batch size: the batch has no labels and no modality tensors")


def build_model(cfg: ModelConfig) -> MultimodalModel:
    """The model described by `cfg` (encoders for cfg.modalities, frozen ones per cfg.<m>.freeze)."""
    return MultimodalModel(cfg)
