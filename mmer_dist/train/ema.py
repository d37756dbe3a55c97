"""An exponential moving average of the model's weights (`train.ema_decay`), for evaluation and export.

After every optimizer step the average moves towards the live weights:

    avg <- avg + r_n (w - avg),   r_n = (1 - d) / (1 - d^n),  d = ema_decay,  n = 1, 2, ... updates

which is the bias-corrected exponential average (as in Adam): exactly sum_k d^(n-k) w_k / sum_k d^(n-k),
so the starting weights carry no extra weight and `d` means what it says from the first step (a window
of about 1 / (1 - d) steps: 200 for 0.995). Training always continues from the live weights;
evaluations, the best/last choice and the export use the average (`with ema.applied(model): ...`
swaps it in and back). Every floating-point entry of the state dict
is averaged (parameters and float buffers); integer buffers are copied. The average is part of every
checkpoint (`accelerator.register_for_checkpointing`), so a resumed run continues it exactly.

It needs the whole weights on every rank: DDP, one process, ZeRO-1/2, not ZeRO-3 (`check_zero_stage`:
the preflight refuses a ZeRO-3 JSON, the loop whatever Accelerate was given).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from mmer_dist.config import ConfigError


def check_zero_stage(ema_decay: float, zero_stage: int | None) -> None:
    """ConfigError for train.ema_decay > 0 under DeepSpeed ZeRO-3 (its ranks hold only shards of the weights)."""
    if ema_decay > 0 and zero_stage == 3:
        raise ConfigError(f"train.ema_decay={ema_decay} needs the whole weights on every rank, which ZeRO-3 "
                          f"partitions; use a ZeRO-2 config (launch/ds_zero2.json) or train.ema_decay=0")


class WeightAverage:
    """Shadow copies (float32, same device) of a model's state dict, updated with `update(model)`."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1), e.g. 0.995; 0 turns averaging off")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    def next_rate(self) -> float:
        """r_n of the next update: 1 for the first (the average starts as the weights), then down to 1 - d."""
        n = self.updates + 1
        return (1.0 - self.decay) / (1.0 - self.decay ** n)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        r = self.next_rate()
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach().float(), r)
            else:
                s.copy_(v)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Load the average into `model` for the block, then restore the live weights exactly."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: s.to(live[k].dtype) for k, s in self.shadow.items()})
        try:
            yield model
        finally:
            model.load_state_dict(live)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) ^ set(shadow)
        if missing:
            raise ValueError(f"the checkpoint's weight average does not fit this model (differing entries: "
                             f"{sorted(missing)[:5]}); resume with the config the run was started with")
        for k, s in self.shadow.items():
            s.copy_(shadow[k])
        self.updates = int(state["updates"])  # type: ignore[arg-type]
