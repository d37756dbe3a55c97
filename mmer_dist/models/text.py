"""Text encoders: token ids -> hidden states of a `transformers` model (kind=hf).

    from mmer_dist.models.registry import build_encoder
    enc = build_encoder("text", EncoderConfig(kind="hf", pretrained="minilm"))
    tokens, mask = enc(batch)          # batch["text_ids"], batch["text_mask"] -> [B, Lt, D], [B, Lt]

size=debug is a random-init 2-layer BERT (MiniLM vocabulary, so the packaged tokenizer fits), small
the packaged all-MiniLM-L6-v2, base roberta-base. `build_text_hf` is the ("text", "hf") entry of mmer_dist.models.registry.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from mmer_dist.config import EncoderConfig
from mmer_dist.models.encoders import Encoder, HFEncoder, hf_backbone, minilm_path, stub_rows


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
        out = self.backbone(input_ids=ids, attention_mask=stub_rows(mask).long())
        return out.last_hidden_state, mask

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {"text_ids": torch.zeros(batch_size, 1, dtype=torch.long, device=device),
                "text_mask": torch.zeros(batch_size, 1, dtype=torch.bool, device=device)}


def debug_config(dropout: float = 0.1) -> Any:
    """The random-init size=debug text model: a 2-layer BERT of width 32 over the MiniLM vocabulary."""
    from transformers import BertConfig

    vocab = json.loads((minilm_path() / "config.json").read_text())["vocab_size"]
    return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, pad_token_id=0,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def build_text_hf(cfg: EncoderConfig, sample_rate: int) -> Encoder:
    """kind=hf: a `transformers` text encoder (the MiniLM copy, a hub id, a local folder, or random-init debug)."""
    backbone, source = hf_backbone("text", cfg, debug_config)
    return HFTextEncoder("text", cfg, backbone, source)

