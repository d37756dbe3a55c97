"""The `cached` encoder kind: precomputed features from `mmer-dist embed` instead of an encoder.

A config names the encoder whose features it expects with the same fields an `hf`/`scratch`
encoder uses, so one preset serves `mmer-dist embed` (which runs that encoder) and
`mmer-dist train` (which reads what it wrote):

    model:
      text: {kind: cached, pretrained: minilm, pooling: mean}      # all-MiniLM-L6-v2, mean-pooled
      audio: {kind: cached, pretrained: scratch, size: debug}      # the from-scratch audio encoder
      video: {kind: cached, pretrained: "", size: debug}           # the random-init debug hf encoder

The expected source of a cached encoder is (name, size, pooling): name = `pretrained` ("minilm", a hub
id, a local folder, "scratch"), or, when empty, the default of `size` (DEFAULT_PRETRAINED; "" = the
random-init debug encoder). It must equal the record `mmer-dist embed` left in the shards' index
(`index.extra["embeddings"][modality]`), else training refuses with both named (`check_embeddings`).
Size only matters for the unnamed encoders ("" and "scratch"); a named one is identified by its name.

The encoder reads `batch["{m}_emb"]` [B, T, D] (T = 1 for pooled vectors) and `batch["{m}_emb_mask"]`
[B, T] (see mmer_dist/data/collate.py) and hands them to the fusion unchanged: no parameters, so a
model of cached encoders trains only fusion + head.

    enc = build_cached("text", EncoderConfig(kind="cached", pretrained="minilm", pooling="mean"))
    check_embeddings(index.extra, cfg.model, cfg.data.modalities, "shards/out/meld-minilm")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmer_dist.config import ConfigError, EncoderConfig, replace
from mmer_dist.models import audio, text, video
from mmer_dist.models.encoders import (DEFAULT_PRETRAINED, MINILM, SCRATCH_SIZES, Encoder,
                                       EncoderLoadError, load_pretrained, resolve_source)

SCRATCH = "scratch"
"""`pretrained` value of a cached encoder whose features came from a kind=scratch encoder."""
EMBEDDINGS_KEY = "embeddings"
"""Key of the per-modality encoder records in `ShardIndex.extra` of embedding shards."""


def source_name(modality: str, cfg: EncoderConfig) -> str:
    """The identity of the encoder `cfg` runs (hf/scratch) or expects (cached): "minilm", a hub id or
    folder, "scratch", or "" for the random-init debug hf encoder."""
    if cfg.kind == SCRATCH or cfg.pretrained == SCRATCH:
        return SCRATCH
    if cfg.pretrained:
        return cfg.pretrained
    return "" if cfg.size == "debug" else DEFAULT_PRETRAINED.get((modality, cfg.size), "")


def source_config(modality: str, cfg: EncoderConfig) -> EncoderConfig:
    """The hf/scratch encoder config that produces the features a cached `cfg` expects (what embed runs).

    Non-cached configs are returned frozen, as they are.
    """
    if cfg.kind != "cached":
        return replace(cfg, freeze=True, unfreeze_after_steps=0)
    if cfg.pretrained == SCRATCH:
        if modality == "text":
            raise ConfigError("model.text.pretrained=scratch: there is no from-scratch text encoder; "
                              "name an hf text encoder (e.g. model.text.pretrained=minilm)")
        return replace(cfg, kind=SCRATCH, pretrained="", dim=0, freeze=True, unfreeze_after_steps=0)
    return replace(cfg, kind="hf", dim=0, freeze=True, unfreeze_after_steps=0)


def expected_source(modality: str, cfg: EncoderConfig) -> dict[str, Any]:
    """What an embedding record must say for `cfg` (cached or not) to accept it."""
    return {"pretrained": source_name(modality, cfg), "size": cfg.size, "pooling": cfg.pooling}


def _same_folder(a: str, b: str) -> bool:
    """True when two names resolve to the same local folder (e.g. "minilm" and its path)."""
    def folder(name: str) -> Path | None:
        try:
            path = Path(resolve_source("text", EncoderConfig(pretrained=name))) if name == MINILM else Path(name)
        except EncoderLoadError:
            return None
        return path.resolve() if path.expanduser().is_dir() else None

    fa, fb = folder(a), folder(b)
    return fa is not None and fa == fb


def source_mismatch(modality: str, cfg: EncoderConfig, record: dict[str, Any]) -> list[str]:
    """Fields where `record` differs from what `cfg` expects ([] = accepted)."""
    want = expected_source(modality, cfg)
    diffs = []
    if want["pretrained"] != record.get("pretrained") and not _same_folder(want["pretrained"], str(record.get("pretrained"))):
        diffs.append("pretrained")
    if want["pretrained"] in ("", SCRATCH) and want["size"] != record.get("size"):
        diffs.append("size")
    if want["pooling"] != record.get("pooling"):
        diffs.append("pooling")
    if cfg.dim and record.get("dim") and cfg.dim != record["dim"]:
        diffs.append("dim")
    return diffs


def describe_record(record: dict[str, Any]) -> str:
    """One line naming an embedding record: encoder, size, pooling, width, weights hash."""
    name = record.get("pretrained")
    name = "random-init hf" if name == "" else name
    return (f"{name} (kind {record.get('kind')}, size {record.get('size')}, pooling {record.get('pooling')}, "
            f"layer {record.get('layer')}, dim {record.get('dim')}, weights {str(record.get('weights_sha256', ''))[:12]})")


def cached_overrides(modality: str, record: dict[str, Any]) -> str:
    """The dotted overrides that make `model.<modality>` a cached encoder accepting `record`."""
    parts = [f"model.{modality}.kind=cached", f"model.{modality}.pretrained={record.get('pretrained') or chr(34) * 2}",
             f"model.{modality}.size={record.get('size')}", f"model.{modality}.pooling={record.get('pooling')}"]
    return " ".join(parts)


def check_embeddings(index_extra: dict[str, Any], model_cfg: Any, modalities: tuple[str, ...] | list[str],
                     shards: str | Path) -> None:
    """Refuse a model/shards pair that does not fit, with both sides named and the fix.

    * a cached encoder on media shards, or on embeddings of another encoder (name/size/pooling/dim);
    * an hf/scratch encoder on embedding shards (they hold no media).
    Raises ConfigError; returns None when every modality in `modalities` fits.
    """
    records: dict[str, Any] | None = (index_extra or {}).get(EMBEDDINGS_KEY)
    for m in modalities:
        cfg: EncoderConfig = getattr(model_cfg, m)
        want = expected_source(m, cfg)
        if cfg.kind == "cached":
            if records is None:
                raise ConfigError(
                    f"model.{m}.kind=cached reads embeddings, but {shards} holds media shards (its index records no "
                    f"encoder). Embed them first: `mmer-dist embed --config CONFIG --shards {shards} --out EMB`, "
                    f"then train with --shards EMB (or set model.{m}.kind=hf/scratch to train on the media)")
            if m not in records:
                raise ConfigError(
                    f"model.{m}.kind=cached but the embedding shards {shards} hold no {m} features (they hold "
                    f"{', '.join(sorted(records)) or 'none'}); embed {m} too (data.modalities in the embed config) or "
                    f"drop it: data.modalities=[{','.join(sorted(records))}]")
            diffs = source_mismatch(m, cfg, records[m])
            if diffs:
                raise ConfigError(
                    f"model.{m} expects features from {want['pretrained'] or 'random-init hf'} (size {cfg.size}, "
                    f"pooling {cfg.pooling}{f', dim {cfg.dim}' if cfg.dim else ''}) but the embeddings in {shards} "
                    f"were made by {describe_record(records[m])}; they differ in {', '.join(diffs)}. Train on "
                    f"embeddings of the expected encoder (`mmer-dist embed` with this config), or accept these "
                    f"with: {cached_overrides(m, records[m])}")
        elif records is not None:
            hint = cached_overrides(m, records[m]) if m in records else f"data.modalities=[{','.join(sorted(records))}]"
            raise ConfigError(
                f"{shards} holds embeddings (made by `mmer-dist embed`), not media, but model.{m}.kind={cfg.kind} "
                f"needs the {m} media. Train on the media shards, or read the embeddings with: {hint}")


# --------------------------------------------------------------------------- the encoder


def _hidden_size(modality: str, cfg: EncoderConfig) -> int:
    """Width D of the features of the encoder a cached `cfg` names, from its config (no weights loaded)."""
    src = source_config(modality, cfg)
    if src.kind == SCRATCH:
        return SCRATCH_SIZES[src.size]["dim"]
    source = resolve_source(modality, src)
    if not source:   # the random-init debug encoders
        make = {"text": text.debug_config, "audio": audio.debug_config, "video": video.debug_config}[modality]
        return int(make().hidden_size)
    conf = Path(source).expanduser() / "config.json"
    if conf.is_file():
        return int(json.loads(conf.read_text(encoding="utf-8"))["hidden_size"])
    from transformers import AutoConfig

    try:
        return int(load_pretrained(AutoConfig, source, f"model.{modality}.pretrained").hidden_size)
    except EncoderLoadError as e:
        raise ConfigError(f"model.{modality}.kind=cached: the width of {source!r} is unknown here ({e}); "
                          f"set model.{modality}.dim=D (the `dim` in the embedding shards' index.json)") from None


class CachedEncoder(Encoder):
    """Features precomputed by `mmer-dist embed`, read from the batch; no parameters."""

    def __init__(self, modality: str, cfg: EncoderConfig) -> None:
        super().__init__(modality, cfg, cfg.dim or _hidden_size(modality, cfg))
        self.input_keys = (f"{modality}_emb", f"{modality}_emb_mask")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "expects": expected_source(self.modality, self.cfg)}

    def forward(self, batch: dict[str, Any], batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        values_key, _ = self.input_keys
        media = {"text": "text_ids", "audio": "audio", "video": "video"}[self.modality]
        if values_key not in batch and media in batch and int(batch[media].shape[0]) > 0:
            raise ValueError(f"model.{self.modality}.kind=cached reads precomputed features (batch[{values_key!r}]) "
                             f"but the batch holds {self.modality} media ({media!r}): these shards were not made by "
                             f"`mmer-dist embed`; embed them first or use model.{self.modality}.kind=hf/scratch")
        return super().forward(batch, batch_size)

    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        values, mask = batch[self.input_keys[0]], batch[self.input_keys[1]].bool()
        if values.dim() == 3 and values.shape[-1] != self.out_dim and not bool(mask.any()):
            # no sample of the batch has this modality: the collate could not know the width
            values = values.new_zeros(values.shape[0], values.shape[1], self.out_dim)
        if values.dim() != 3 or values.shape[-1] != self.out_dim:
            raise ValueError(f"model.{self.modality}.kind=cached expects features [B, T, {self.out_dim}], got "
                             f"{tuple(values.shape)}; the shards' encoder has another width: set "
                             f"model.{self.modality}.dim or embed with the configured encoder")
        return values.float(), mask

    def stub(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {self.input_keys[0]: torch.zeros(batch_size, 1, self.out_dim, device=device),
                self.input_keys[1]: torch.zeros(batch_size, 1, dtype=torch.bool, device=device)}


def build_cached(modality: str, cfg: EncoderConfig, sample_rate: int = 16000) -> Encoder:
    """The cached encoder of `modality` (the (modality, "cached") entries of mmer_dist.models.registry)."""
    return CachedEncoder(modality, cfg)

