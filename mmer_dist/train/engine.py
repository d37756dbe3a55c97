"""The training engine: the Accelerator (DDP or DeepSpeed, gloo on CPU), and what the loop needs of it.

    accelerator = build_accelerator(cfg)                   # creates the process group
    fill_deepspeed_sizes(accelerator, model)               # ZeRO-3 "auto" buckets of a multimodal model
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)   # never the loaders
    model = rewrap_model(accelerator, model)               # after encoders were unfrozen (DDP)
    bare = unwrap(accelerator, model)                      # without importing DeepSpeed when it is not used
    sd = full_state_dict(accelerator, model)               # a collective: ZeRO-3 shards gathered

Accelerate creates the process group and prepares the model, the optimizer and the scheduler
only: the rank loaders are already split by rank (mmer_dist.data.loader) and `prepare` would shard
them a second time, silently. DeepSpeed is imported only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from typing import Any, Iterator

import torch

from mmer_dist import dist
from mmer_dist.config import Config


def deepspeed_config_path(cfg: Config) -> str:
    """The DeepSpeed JSON of the run: train.deepspeed, else $MMER_DEEPSPEED_CONFIG, else "" (none)."""
    return cfg.train.deepspeed or os.environ.get("MMER_DEEPSPEED_CONFIG", "")


def uses_deepspeed(cfg: Config) -> bool:
    """True when the run trains under DeepSpeed (a JSON is named, or `accelerate launch` asked for it)."""
    return bool(deepspeed_config_path(cfg)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(cfg: Config) -> Any:
    """Accelerator for this machine: gloo without CUDA, DeepSpeed when asked, no loader handling."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    dist.export_slurm_env()
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "gradient_accumulation_steps": cfg.train.grad_accum,
        # Our scheduler counts optimizer steps; Accelerate's default would step it once per process.
        "step_scheduler_with_optimizer": False,
        "cpu": not cuda,
    }
    if dist.world_info().world_size > 1:
        # Without CUDA Accelerate would pick no backend (or nccl); name gloo/nccl explicitly. Passing it
        # to a single process makes Accelerate expect a process group that never starts.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(
            backend=dist.backend(cuda), timeout=datetime.timedelta(seconds=cfg.train.dist_timeout_s))]
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    kwargs["mixed_precision"] = mp
    ds_config = deepspeed_config_path(cfg)
    if uses_deepspeed(cfg):
        if not cuda:
            # DeepSpeed's shared-memory comm op compiles a C++ extension; gloo does the job on CPU.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if ds_config:
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
        # cpu=True would silently turn DeepSpeed off (plain MULTI_CPU DDP); DeepSpeed picks its CPU
        # accelerator by itself and runs over the gloo group named above.
        kwargs["cpu"] = False
    accelerator = Accelerator(**kwargs)
    if accelerator.state.deepspeed_plugin is not None:
        # The training config is the single source of truth: fill DeepSpeed's "auto" values from it.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * accelerator.num_processes
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.optim.grad_clip
    return accelerator


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage of the engine, None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else None


def fill_deepspeed_sizes(accelerator: Any, model: torch.nn.Module) -> None:
    """ZeRO-3 bucket sizes left "auto": Accelerate derives them from `model.config.hidden_size`, which a
    multimodal model does not have; use the widest linear layer instead (same formulas as Accelerate)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    hidden = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=256)
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value


def unwrap(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside the DDP / torch.compile wrappers (Accelerate's `unwrap_model` under DeepSpeed).

    Accelerate (1.15) `unwrap_model` -> `extract_model_from_parallel` imports deepspeed whenever it is
    installed, only to test isinstance against DeepSpeedEngine; that import (DeepSpeed 0.19) probes the
    accelerators and prints "Setting accelerator to CPU" in every run. A run without DeepSpeed has no
    DeepSpeedEngine to unwrap, so it never calls it.
    """
    from mmer_dist.train.optim import bare_model

    if accelerator.state.deepspeed_plugin is not None:
        return accelerator.unwrap_model(model)
    return bare_model(model)


def rewrap_model(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Prepare the unwrapped model again after parameters became trainable (DDP only).

    DDP fixes its gradient buckets from `requires_grad` at wrap time, so parameters unfrozen later
    would never be all-reduced. Accelerate (1.x, checked on 1.15) has no public "unprepare": its
    private `_models` list is edited so the old wrapper is not saved twice by `save_state`.
    """
    if accelerator.num_processes == 1:
        return model
    inner = unwrap(accelerator, model)
    accelerator._models = [m for m in accelerator._models if m is not model]
    return accelerator.prepare_model(inner)


def full_state_dict(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on the main rank (gathers ZeRO-3 shards; a collective on every rank)."""
    if accelerator.state.deepspeed_plugin is not None:
        return accelerator.get_state_dict(model)
    return accelerator.get_state_dict(unwrap(accelerator, model), unwrap=False)   # no deepspeed import (unwrap)


def param_checksum(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes (this rank's view; ZeRO-3 shards differ by design)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def whole_hf_models() -> Iterator[None]:
    """Build transformers models unpartitioned even while a ZeRO-3 engine is registered.

    transformers (5.x, checked on 5.24) creates every parameter of a model built while a ZeRO-3 config
    is registered under `deepspeed.zero.Init`, as an empty shard; evaluating the exported best model
    needs whole weights on every rank. There is no public switch back, so the private weak reference
    `_hf_deepspeed_config_weak_ref` is saved and restored around the block.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
