"""What a run writes about itself: log.jsonl and TensorBoard scalars, and the environment report.

    log = RunLog(run_dir, enabled=accelerator.is_main_process)
    log.write({"step": 10, "epoch": 0, "split": "train", "loss": 1.9, "lr/fusion": 1e-3, "lr/text": 1e-4})
    (run_dir / "env.json").write_text(json.dumps(environment_info(accelerator)))

Every numeric field of a record becomes the TensorBoard scalar `{split}/{field}` at its step (`lr/fusion`
of a train record: `train/lr/fusion`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def environment_info(accelerator: Any) -> dict[str, Any]:
    """Versions, devices and the launch of this run (env.json)."""
    import accelerate
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device), "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpus": os.cpu_count(), "mixed_precision": accelerator.mixed_precision,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "hostname": platform.node(),
    }
    if "deepspeed" in sys.modules:          # only a run that uses DeepSpeed imports it
        info["deepspeed"] = sys.modules["deepspeed"].__version__
    return info


class RunLog:
    """log.jsonl + TensorBoard scalars, main rank only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
            self.file = open(run_dir / "log.jsonl", "a", encoding="utf-8")

    def write(self, record: dict[str, Any], per_class: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        split, step = record.get("split", "train"), record["step"]
        for k, v in record.items():
            if k not in ("step", "epoch", "split") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        for label, f1 in (per_class or {}).items():
            self.tb.add_scalar(f"{split}/f1_per_class/{label}", f1, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.file.close()
