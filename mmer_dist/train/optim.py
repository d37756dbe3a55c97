"""Optimiser, learning-rate schedule and the freeze-then-unfreeze schedule.

    groups = param_groups(model, cfg.optim)                 # encoders at encoder_lr, the rest at lr
    optimizer = build_optimizer(model, cfg.optim)           # AdamW over those groups
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)   # linear warmup + cosine
    group_lrs(optimizer)                                    # {"text": 1e-4, "fusion": 1e-3}: log.jsonl's lr/<name>

Parameter groups: one pair per component - each encoder ("text", "audio", "video") and "fusion"
(fusion transformer + head) - split into "decay" and "no_decay" (biases, norm weights, every
1-D tensor and the names in `model.no_weight_decay()`); each group dict carries a "name" like
"text/no_decay" for logging. Parameters with requires_grad=False are not in any group, so a frozen
encoder has no optimizer state at all (not lr=0).

Freeze-then-unfreeze (`model.<m>.freeze=true, unfreeze_after_steps=N`): the encoder is built
frozen; before the forward pass of each optimizer step the loop calls

    if apply_freeze_schedule(model, cfg.model, step):       # step = optimizer steps done so far
        add_unfrozen_params(optimizer, model, cfg.optim, scheduler)
        # + re-wrap the model for DDP: DDP fixes its gradient buckets from requires_grad at wrap
        #   time, so newly trainable parameters would otherwise never be all-reduced.

`add_unfrozen_params` appends new param groups (AdamW state for them starts then) and extends the
LambdaLR scheduler so they follow the same warmup/cosine curve from the current step. DeepSpeed
cannot add parameters to an initialised engine: with DeepSpeed, use freeze without unfreezing.
Resume after the unfreeze step: build the optimizer and scheduler as at step 0, call
`apply_freeze_schedule` + `add_unfrozen_params` with the resumed step, then load their state dicts -
the groups are then exactly in the order they were saved in (a group is always appended, never
inserted).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from mmer_dist.config import ConfigError, ModelConfig, OptimConfig

FUSION = "fusion"
"""Component name of everything that is not an encoder (fusion transformer and head)."""


def bare_model(module: nn.Module) -> nn.Module:
    """The model inside DDP / Accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def component_of(name: str) -> str:
    """"encoders.text.backbone..." -> "text"; anything else -> "fusion"."""
    parts = name.split(".")
    return parts[1] if parts[0] == "encoders" and len(parts) > 2 else FUSION


def param_groups(model: nn.Module, cfg: OptimConfig, only: Iterable[nn.Parameter] | None = None) -> list[dict[str, Any]]:
    """AdamW groups for the trainable parameters of `model` (or of `only` among them), in a fixed order."""
    model = bare_model(model)
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    wanted = None if only is None else {id(p) for p in only}
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (wanted is not None and id(p) not in wanted):
            continue
        comp = component_of(name)
        is_encoder = comp != FUSION
        if is_encoder and cfg.encoder_lr == 0:
            raise ConfigError(f"optim.encoder_lr=0 but encoder {comp!r} is trainable ({name}); to keep it fixed set "
                              f"model.{comp}.freeze=true (frozen encoders are left out of the optimizer)")
        decay = p.ndim > 1 and name not in no_decay_names
        key = f"{comp}/{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(key, {"name": key, "params": [], "lr": cfg.encoder_lr if is_encoder else cfg.lr,
                                        "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(p)
    # Canonical order: components as they appear in the model (encoders, then fusion), decay before no_decay.
    components = list(dict.fromkeys(k.split("/")[0] for k in groups))
    return sorted(groups.values(), key=lambda g: (components.index(g["name"].split("/")[0]), g["name"].endswith("/no_decay")))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each component ("text", "audio", "video", "fusion": fusion + head), from
    the groups' names; the decay and no_decay groups of a component share it. Frozen encoders have no group."""
    lrs: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        lrs.setdefault(str(group.get("name", f"group{i}")).split("/")[0], float(group["lr"]))
    return lrs


def build_optimizer(model: nn.Module, cfg: OptimConfig, torch_adam: bool = True) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model, cfg)`.

    torch_adam=True: torch.optim.AdamW (what DeepSpeed's `"torch_adam": true` also uses; no build step).
    torch_adam=False: DeepSpeed's FusedAdam on CUDA / DeepSpeedCPUAdam on CPU in AdamW mode (compiled on
    first use, ~45 s on CPU; needed for ZeRO-Offload).
    """
    groups = param_groups(model, cfg)
    if not groups:
        raise ConfigError("no trainable parameters: every encoder is frozen and the fusion/head has none")
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    if torch_adam:
        return torch.optim.AdamW(groups, **kwargs)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)


class WarmupCosine:
    """LR multiplier: linear warmup to 1 over `warmup` steps, cosine to `min_ratio` at step total-1, then flat.

    A callable object (not a closure) so LambdaLR.state_dict() records it.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        span = max(1, self.total - 1 - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (cfg.warmup_steps) then cosine decay to lr x cfg.min_lr_ratio at step total_steps-1.

    Step it once per optimizer step. Every group follows the same curve relative to its own lr.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps}: the schedule needs at least one optimizer step "
                          f"(check train.max_steps / train.epochs and the split size)")
    if cfg.warmup_steps >= total_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.warmup_steps} >= the run's {total_steps} optimizer steps; "
                          f"lower optim.warmup_steps")
    fn = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [fn] * len(optimizer.param_groups))


def apply_freeze_schedule(model: nn.Module, cfg: ModelConfig, step: int) -> bool:
    """Unfreeze the encoders whose `unfreeze_after_steps` has been reached at `step`; True if any changed.

    Idempotent; encoders with freeze=true and unfreeze_after_steps=0 stay frozen for good.
    """
    model = bare_model(model)
    changed = False
    for m, encoder in getattr(model, "encoders", {}).items():
        enc_cfg = getattr(cfg, m)
        if enc_cfg.freeze and 0 < enc_cfg.unfreeze_after_steps <= step and encoder.frozen:
            encoder.set_frozen(False)
            encoder.train(model.training)
            changed = True
    return changed


def add_unfrozen_params(optimizer: torch.optim.Optimizer, model: nn.Module, cfg: OptimConfig,
                        scheduler: Any = None) -> list[str]:
    """Append groups for trainable parameters the optimizer does not hold yet; returns their group names.

    `optimizer`/`scheduler` may be Accelerate wrappers. The new groups get the scheduler's current
    multiplier right away and follow its curve from then on.
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in bare_model(model).parameters() if p.requires_grad and id(p) not in held]
    if not new:
        return []
    groups = param_groups(model, cfg, only=new)
    sched = getattr(scheduler, "scheduler", scheduler)
    for group in groups:
        base_lr = group["lr"]
        optimizer.add_param_group(group)
        added = optimizer.param_groups[-1]
        added["initial_lr"] = base_lr
        if sched is not None:
            fn = sched.lr_lambdas[0]
            sched.lr_lambdas.append(fn)
            sched.base_lrs.append(base_lr)
            added["lr"] = base_lr * fn(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in optimizer.param_groups]
    return [g["name"] for g in groups]
