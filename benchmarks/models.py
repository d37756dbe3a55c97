"""Model figures: parameter counts per size and modality, build time, CPU forward+backward samples/s.

Prints one JSON line per figure; every line carries the machine and library versions. The baseline
measured in the same run is the fusion + head alone on precomputed encoder outputs (what training
on cached embeddings costs), so `ratio_to_fusion_only` says how much the encoders cost.

    .venv/bin/python benchmarks/models.py                       # debug and small, batch 8
    .venv/bin/python benchmarks/models.py --sizes debug --seconds 3

Sizes whose pretrained weights are not available offline (roberta-base, wav2vec2/WavLM, VideoMAE
hub ids) are reported as {"available": false, "reason": ...} instead of a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmer_dist.config import EncoderConfig, FusionConfig, ModelConfig
from mmer_dist.models import build_model
from mmer_dist.models.encoders import EncoderLoadError
from mmer_dist.models.registry import build_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import example_batch  # noqa: E402  (the tests' random batches, tests/helpers.py)

FUSION = {"debug": FusionConfig(width=32, layers=1, heads=2), "small": FusionConfig(width=64, layers=2, heads=4),
          "base": FusionConfig(width=256, layers=4, heads=4)}


def machine() -> dict[str, Any]:
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available()}


def emit(env: dict[str, Any], **fields: Any) -> None:
    print(json.dumps({**fields, "machine": env}), flush=True)


def text_cfg(size: str) -> EncoderConfig:
    return EncoderConfig(kind="hf", pretrained="", size=size)


def model_cfg(size: str, modalities: tuple[str, ...] = ("text", "audio", "video")) -> ModelConfig:
    return ModelConfig(text=text_cfg(size), audio=EncoderConfig(kind="scratch", size=size),
                       video=EncoderConfig(kind="scratch", size=size), fusion=FUSION[size],
                       modalities=modalities, num_classes=7)


def count(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def param_figures(env: dict[str, Any], sizes: list[str]) -> None:
    for size in sizes:
        for modality, kind in (("text", "hf"), ("audio", "scratch"), ("audio", "hf"), ("video", "scratch"), ("video", "hf")):
            cfg = text_cfg(size) if modality == "text" else EncoderConfig(kind=kind, size=size)
            start = time.perf_counter()
            try:
                enc = build_encoder(modality, cfg)
            except EncoderLoadError as e:
                emit(env, figure="encoder_params", size=size, modality=modality, kind=kind, available=False,
                     reason=str(e).splitlines()[0])
                continue
            total, trainable = count(enc)
            emit(env, figure="encoder_params", size=size, modality=modality, kind=kind, available=True,
                 source=enc.describe().get("source"), params=total, trainable=trainable, out_dim=enc.out_dim,
                 build_seconds=round(time.perf_counter() - start, 3))


def throughput(model: torch.nn.Module, batch: dict[str, Any], seconds: float, forward: Any = None) -> dict[str, Any]:
    """Forward + backward + SGD-free step repeated for about `seconds`; samples/s over the timed part."""
    forward = forward or model
    model.train()
    b = int(batch["labels"].shape[0])

    def one() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(batch), batch["labels"]).backward()

    for _ in range(2):  # warm-up (allocator, lazy inits)
        one()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        one()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": round(elapsed, 3), "samples_per_s": round(steps * b / elapsed, 2),
            "ms_per_step": round(1000 * elapsed / steps, 1)}


def speed_figures(env: dict[str, Any], sizes: list[str], batch_size: int, seconds: float,
                  audio_seconds: float, frames: int, image_size: int, text_len: int) -> None:
    shape = {"batch_size": batch_size, "audio_seconds": audio_seconds, "frames": frames,
             "image_size": image_size, "text_tokens": text_len}
    for size in sizes:
        batch = example_batch(batch_size, text_len=text_len, audio_samples=int(audio_seconds * 16000),
                              frames=frames, image_size=image_size)
        batch["labels"] = batch["labels"] % 7
        torch.manual_seed(0)
        try:
            start = time.perf_counter()
            model = build_model(model_cfg(size))
            build_s = time.perf_counter() - start
        except EncoderLoadError as e:
            emit(env, figure="train_step", size=size, available=False, reason=str(e).splitlines()[0])
            continue
        total, trainable = count(model)
        # Baseline: the fusion + head on fixed encoder outputs (the cached-embedding path).
        with torch.no_grad():
            model.eval()
            feats = {m: (t.detach(), k) for m, (t, k) in model.encode(batch).items()}
        base = throughput(model, batch, seconds, forward=lambda _b: model.head(model.fusion(feats)))
        full = throughput(model, batch, seconds)
        emit(env, figure="train_step", size=size, variant="fusion_only_on_cached_features", available=True, **shape, **base)
        emit(env, figure="train_step", size=size, variant="full_model", available=True, params=total,
             trainable=trainable, build_seconds=round(build_s, 3), **shape, **full,
             ratio_to_fusion_only=round(full["samples_per_s"] / base["samples_per_s"], 4))
        for m in ("text", "audio", "video"):
            torch.manual_seed(0)
            single = build_model(model_cfg(size, (m,)))
            emit(env, figure="train_step", size=size, variant=f"{m}_only", available=True, params=count(single)[0],
                 **shape, **throughput(single, batch, seconds))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="debug,small", help="comma list of debug, small, base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per figure")
    p.add_argument("--audio-seconds", type=float, default=3.0)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=32)
    args = p.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    # Hub ids that are not cached fail fast instead of retrying for ~30 s each (HF_HUB_OFFLINE=0 to allow the hub).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = machine()
    build_encoder("text", text_cfg("debug"))  # import transformers' modeling code once, outside the timings
    param_figures(env, sizes)
    speed_figures(env, sizes, args.batch_size, args.seconds, args.audio_seconds, args.frames, args.image_size,
                  args.text_tokens)


if __name__ == "__main__":
    main()
