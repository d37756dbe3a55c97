"""Checkpoints (everything with state, resumable) and the exported model (self-describing).

A run folder looks like:

    RUN_DIR/config.yaml                 the resolved config
    RUN_DIR/checkpoints/step-000120/    accelerator.save_state (model, optimizer, scheduler, RNG of
                                        every rank) + trainer_state.json (step, epoch, sampler
                                        position, best score, ...) written LAST: marks it complete
    RUN_DIR/best/                       exported model of the best dev Macro-F1 so far
    RUN_DIR/export/                     the final exported model (= best, with its metrics)

An exported model folder holds `model.json` (model config, decode config, label names) and
`model.safetensors`, and loads without the training config: `load_exported(path)`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmer_dist.config import DataConfig, ModelConfig
from mmer_dist.presets import build, to_dict
from mmer_dist.shards.schema import write_json_atomic

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
EXPORT_META = "model.json"
EXPORT_WEIGHTS = "model.safetensors"
_STEP_RE = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainerState:
    """What the loop needs besides model/optimizer/scheduler/RNG to continue exactly."""

    step: int = 0                     # optimizer steps done
    epoch: int = 0                    # current epoch
    batches_in_epoch: int = 0         # micro-batches of `epoch` already consumed on every rank
    best_score: float = -1.0          # best dev Macro-F1 so far
    best_step: int = -1
    samples_seen: int = 0             # global, over all ranks
    total_steps: int = 0              # the run's planned optimizer steps (the schedule's length), set at its start
    # Every sample accounted for (mmer_dist.train.accounting), summed over ranks and the run's processes:
    samples_read: int = 0             # training samples drawn: delivered + skipped
    skipped: dict[str, int] = field(default_factory=dict)    # decode failures by reason
    degraded: dict[str, int] = field(default_factory=dict)   # samples kept without a modality, by reason
    epoch_drawn: int = 0              # samples drawn so far in `epoch`, and their multiset digest
    epoch_digest: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).exists()]


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `latest` (None when the run has none yet) or a path.

    Call on the main rank only and broadcast the answer (dist.broadcast_object), so every rank
    loads the same checkpoint even if a new one appears while they start.
    """
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"train.resume={resume}: {path / TRAINER_STATE} not found; "
                                f"pass a checkpoint folder under {Path(run_dir) / CHECKPOINT_DIR} or resume=latest")
    return path


def read_trainer_state(ckpt: Path) -> TrainerState:
    with open(Path(ckpt) / TRAINER_STATE, encoding="utf-8") as f:
        data = json.load(f)
    return TrainerState(**{k: v for k, v in data.items() if k in TrainerState.__dataclass_fields__})


def read_checkpoint_extra(ckpt: Path) -> dict[str, Any]:
    with open(Path(ckpt) / TRAINER_STATE, encoding="utf-8") as f:
        return json.load(f).get("extra", {})


def save_checkpoint(accelerator: Any, run_dir: Path, state: TrainerState, extra: dict[str, Any], keep: int) -> Path:
    """Save everything with state; every rank must call this (DeepSpeed saves shards per rank)."""
    path = checkpoint_dir(run_dir, state.step)
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(path / TRAINER_STATE, {**state.to_json(), "extra": extra})
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        # half-written checkpoints of a killed run (no trainer_state.json) are useless: drop them
        for p in (Path(run_dir) / CHECKPOINT_DIR).iterdir():
            if p != path and _STEP_RE.match(p.name) and not (p / TRAINER_STATE).exists():
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def export_model(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, data_cfg: DataConfig,
                 labels: list[str], path: Path, info: dict[str, Any] | None = None) -> None:
    """Write a self-describing model folder (main rank only): config + labels + weights."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / EXPORT_WEIGHTS))
    write_json_atomic(tmp / EXPORT_META, {"model": to_dict(model_cfg), "data": to_dict(data_cfg),
                                          "labels": list(labels), "info": info or {}})
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def find_export(model_path: str | Path) -> Path:
    """A run folder (its export/, else best/) or an exported model folder, with a clear error."""
    p = Path(model_path)
    for candidate in (p, p / "export", p / "best"):
        if (candidate / EXPORT_META).exists() and (candidate / EXPORT_WEIGHTS).exists():
            return candidate
    raise FileNotFoundError(f"{p} is not an exported model or a finished run folder (no {EXPORT_META} + "
                            f"{EXPORT_WEIGHTS} in it, in export/ or in best/). Train one with "
                            f"`mmer-dist train --config NAME --out RUN_DIR`, then pass RUN_DIR.")


def load_exported(model_path: str | Path) -> tuple[torch.nn.Module, ModelConfig, DataConfig, list[str]]:
    """Rebuild an exported model on CPU in eval mode: (model, model_cfg, data_cfg, labels)."""
    from safetensors.torch import load_file

    from mmer_dist.models import build_model

    path = find_export(model_path)
    meta = json.loads((path / EXPORT_META).read_text(encoding="utf-8"))
    model_cfg = build(ModelConfig, meta["model"], "model")
    data_cfg = build(DataConfig, meta["data"], "data")
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(load_file(str(path / EXPORT_WEIGHTS)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path / EXPORT_WEIGHTS} does not match its {EXPORT_META}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; re-export the model with this version of mmer_dist")
    model.eval()
    return model, model_cfg, data_cfg, list(meta["labels"])

