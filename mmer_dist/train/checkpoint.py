"""Checkpoints (everything with state, resumable) and the exported model (self-describing).

A run folder looks like:

    RUN_DIR/config.yaml                 the resolved config, written once by the run's first start
    RUN_DIR/resumes.jsonl               one line per later start: step, checkpoint, changed keys
                                        (mmer_dist.train.resume)
    RUN_DIR/checkpoints/step-000120/    accelerator.save_state (model, optimizer, scheduler, RNG of
                                        every rank) + trainer_state.json (step, epoch, sampler
                                        position, best score, ...) written LAST: marks it complete
    RUN_DIR/best/                       exported model of the best dev Macro-F1 so far
    RUN_DIR/export/                     the final exported model (= best, with its metrics)

An exported model folder holds `model.json` (model config, decode config, label names) and
`model.safetensors`, and loads without the training config: `load_exported(path)`. A checkpoint
folder loads too (`mmer-dist eval/predict --model RUN/checkpoints/step-N`): the weights Accelerate
saved in it (the weight average instead when train.ema_decay > 0, as the run's evaluations used),
the configs from RUN/config.yaml and the label names from its trainer_state.json.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmer_dist.config import ConfigError, DataConfig, ModelConfig
from mmer_dist.jsonio import damaged, read_json
from mmer_dist.presets import build, config_from_file, to_dict
from mmer_dist.shards.schema import write_json_atomic

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
EXPORT_META = "model.json"
EXPORT_WEIGHTS = "model.safetensors"
CHECKPOINT_WEIGHTS = "model.safetensors"          # what accelerator.save_state writes for the (one) model
CHECKPOINT_AVERAGE = "custom_checkpoint_0.pkl"    # the weight average, registered for checkpointing
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
    total_steps: int = 0              # the run's planned optimizer steps, set at its start (or a resume's new length)
    length: list[int] = field(default_factory=list)          # [train.epochs, train.max_steps] total_steps was set from
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
    """The checkpoint to resume from: `latest` (None when the run has none yet), `must` (the same, but
    ConfigError when there is none) or a path.

    Call on the main rank only and broadcast the answer (dist.broadcast_object), so every rank
    loads the same checkpoint even if a new one appears while they start.
    """
    if not resume:
        return None
    if resume in ("latest", "must"):
        found = complete_checkpoints(run_dir)
        if not found and resume == "must":
            raise ConfigError(f"train.resume=must: {run_dir} has no complete checkpoint ({CHECKPOINT_DIR}/step-N/"
                              f"{TRAINER_STATE}); check --out, or pass resume=latest to start fresh when there is none")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"train.resume={resume}: {path / TRAINER_STATE} not found; "
                                f"pass a checkpoint folder under {Path(run_dir) / CHECKPOINT_DIR} or resume=latest")
    return path


def _trainer_state_json(ckpt: Path) -> dict[str, Any]:
    return read_json(Path(ckpt) / TRAINER_STATE, fix=f"that checkpoint is damaged: delete {ckpt} and resume from the "
                                                     f"one before it (resume=latest picks the newest complete one)")


def read_trainer_state(ckpt: Path) -> TrainerState:
    data = _trainer_state_json(ckpt)
    return TrainerState(**{k: v for k, v in data.items() if k in TrainerState.__dataclass_fields__})


def read_checkpoint_extra(ckpt: Path) -> dict[str, Any]:
    return _trainer_state_json(ckpt).get("extra", {})


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


def is_checkpoint(path: str | Path) -> bool:
    """True for a complete checkpoint folder (RUN/checkpoints/step-N with its trainer_state.json)."""
    return (Path(path) / TRAINER_STATE).is_file()


def find_export(model_path: str | Path) -> Path:
    """A run folder (its export/, else best/), an exported model folder or a checkpoint folder, with a clear error."""
    p = Path(model_path)
    for candidate in (p, p / "export", p / "best"):
        if (candidate / EXPORT_META).exists() and (candidate / EXPORT_WEIGHTS).exists():
            return candidate
    if is_checkpoint(p):
        return p
    raise FileNotFoundError(f"{p} is not an exported model, a checkpoint folder or a finished run folder (no "
                            f"{EXPORT_META} + {EXPORT_WEIGHTS} in it, in export/ or in best/, no {TRAINER_STATE}). "
                            f"Train one with `mmer-dist train --config NAME --out RUN_DIR`, then pass RUN_DIR "
                            f"(or RUN_DIR/{CHECKPOINT_DIR}/step-N).")


def selected_on(model_dir: Path) -> str | None:
    """The split an exported model was chosen on (train.select=best's evaluations); None for a checkpoint of a
    step and for train.select=last. Exports made before the field: the split they were evaluated on."""
    if is_checkpoint(model_dir):
        return None
    info = read_json(model_dir / EXPORT_META, fix="restore the export, or evaluate a checkpoint").get("info", {})
    return info["selected_on"] if "selected_on" in info else info.get("split")


def run_dir_of(model_dir: Path) -> Path:
    """The run folder of an exported model (RUN/export, RUN/best) or of a checkpoint (RUN/checkpoints/step-N)."""
    return model_dir.parent.parent if is_checkpoint(model_dir) else model_dir.parent


def _strip_wrappers(key: str) -> str:
    """A weight name as the bare model names it (DDP saves `module.`, torch.compile `_orig_mod.`)."""
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def _exported_parts(path: Path) -> tuple[ModelConfig, DataConfig, list[str], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    fix = (f"restore the folder, or evaluate one of the run's checkpoints instead "
           f"(--model RUN/{CHECKPOINT_DIR}/step-N)")
    meta = read_json(path / EXPORT_META, fix=fix)
    try:
        parts = build(ModelConfig, meta["model"], "model"), build(DataConfig, meta["data"], "data"), list(meta["labels"])
    except (KeyError, ConfigError) as e:
        raise damaged(path / EXPORT_META, f"is not a {EXPORT_META} written by mmer_dist ({e})", fix) from None
    return (*parts, load_file(str(path / EXPORT_WEIGHTS)))


def _checkpoint_parts(ckpt: Path) -> tuple[ModelConfig, DataConfig, list[str], dict[str, torch.Tensor]]:
    """A checkpoint's weights (the average when the run evaluated one), its run's configs, the label names."""
    from safetensors.torch import load_file

    from mmer_dist.shards.schema import load_index

    cfg = config_from_file(run_dir_of(ckpt) / "config.yaml")
    if not (ckpt / CHECKPOINT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{ckpt} holds no {CHECKPOINT_WEIGHTS}" + (
            " (DeepSpeed saved it: evaluate RUN/best or RUN/export, or convert it with DeepSpeed's zero_to_fp32.py)"
            if (ckpt / "pytorch_model").is_dir() else "; it is not a checkpoint written by `mmer-dist train`"))
    if cfg.train.ema_decay > 0 and (ckpt / CHECKPOINT_AVERAGE).is_file():
        weights = torch.load(ckpt / CHECKPOINT_AVERAGE, weights_only=True)["shadow"]
    else:
        weights = load_file(str(ckpt / CHECKPOINT_WEIGHTS))
    # checkpoints record their label names; older ones: the run's shards do
    labels = read_checkpoint_extra(ckpt).get("labels") or list(load_index(cfg.data.shards).labels)
    return cfg.model, cfg.data, labels, {_strip_wrappers(k): v for k, v in weights.items()}


def load_exported(model_path: str | Path) -> tuple[torch.nn.Module, ModelConfig, DataConfig, list[str]]:
    """Rebuild an exported model, or a checkpoint's, on CPU in eval mode: (model, model_cfg, data_cfg, labels)."""
    from mmer_dist.models import build_model

    path = find_export(model_path)
    model_cfg, data_cfg, labels, weights = _checkpoint_parts(path) if is_checkpoint(path) else _exported_parts(path)
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise damaged(path, f"holds weights that do not fit its config: missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}", "evaluate another checkpoint or export of the run")
    model.eval()
    return model, model_cfg, data_cfg, labels
