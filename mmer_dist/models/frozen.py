"""The frozen encoders `mmer-dist embed` runs, built exactly as training builds them, and their records.

    model, records = build_frozen_encoders(cfg.model, cfg.data, cfg.train.seed, ("text", "audio"), num_classes=7)
    feats = model.encoders["text"](batch)             # (tokens, mask)
    records["text"]["weights_sha256"]                 # what the embedding index keeps of each encoder

`torch.manual_seed(seed)` then `build_model`, as `mmer-dist train` does, so random-init (debug) encoders
get the very weights a frozen training run of the same config has. A kind=cached encoder config builds
the encoder it expects (mmer_dist.models.cached.source_config). The records identify the features
(kind, name, source, size, pooling, layer, width, dtype, sha256 of the weights, decode settings) so a
training run can refuse embeddings of another encoder (mmer_dist.models.cached.check_embeddings).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from mmer_dist.config import DataConfig, ModelConfig, replace
from mmer_dist.models.cached import source_config, source_name
from mmer_dist.models.fusion import build_model

STORE_DTYPE = np.float16
"""How embedding shards store features (KEY.emb.{m}.npy)."""


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_frozen_encoders(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, modalities: tuple[str, ...],
                          num_classes: int) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The frozen encoders embed runs (built as `mmer-dist train` builds them) and their index records."""
    sources = {m: source_config(m, getattr(model_cfg, m)) for m in modalities}
    model_cfg = replace(model_cfg, modalities=modalities, num_classes=num_classes, sample_rate=data_cfg.sample_rate,
                        **sources)
    torch.manual_seed(seed)                      # same weights as the frozen encoders of a training run
    model = build_model(model_cfg)
    model.eval()
    records: dict[str, dict[str, Any]] = {}
    for m in modalities:
        enc, scfg = model.encoders[m], sources[m]
        desc = enc.describe()
        backbone = getattr(enc, "backbone", None)
        layers = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
        if layers is None and hasattr(enc, "transformer"):
            layers = len(enc.transformer.layers)
        random_init = scfg.kind == "scratch" or not scfg.pretrained and scfg.size == "debug"
        records[m] = {
            "kind": scfg.kind, "pretrained": source_name(m, scfg), "source": desc.get("source", ""),
            "size": scfg.size, "pooling": scfg.pooling, "layer": "last", "num_layers": layers,
            "dim": int(enc.out_dim), "dtype": np.dtype(STORE_DTYPE).name,
            "stored": "tokens" if scfg.pooling == "tokens" else "vector",
            "weights_sha256": weights_sha256(enc), "config_hash": desc.get("config_hash", ""),
            "revision": desc.get("revision", ""), "model_type": desc.get("model_type", ""),
            "init_seed": seed if random_init else None,
        }
        if m == "text":
            records[m]["max_text_tokens"] = data_cfg.max_text_tokens
        elif m == "audio":
            records[m].update(sample_rate=data_cfg.sample_rate, max_audio_seconds=data_cfg.max_audio_seconds)
        else:
            records[m].update(video_frames=data_cfg.video_frames, video_size=data_cfg.video_size)
    return model, records
