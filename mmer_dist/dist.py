"""Everything distributed lives here: world info, process group, rank helpers, reductions.

The world is read from the environment the launcher left behind, in this order:

* torchrun / `accelerate launch` / DeepSpeed: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
* Slurm `srun` (one task per process): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the
  head node taken from SLURM_JOB_NODELIST;
* otherwise a single process (rank 0 of 1).

No other module calls torch.distributed; models contain no distributed code at all.

    info = world_info()            # WorldInfo(rank=0, world_size=1, local_rank=0, ...)
    if is_main(): print("hello")
    total = all_reduce_sum(torch.tensor([n]))
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch


def _torch_dist() -> Any:
    """torch.distributed, imported on first use: world info and Slurm helpers need no torch (fast --help)."""
    import torch.distributed

    return torch.distributed


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str            # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm nodelist: `gpu[01-03,07],cpu5` -> [gpu01, gpu02, gpu03, gpu07, cpu5]."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*?)\[(.*?)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def world_info(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, world size and rendezvous address from the launcher's environment variables."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        return WorldInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
            master_port=port,
            source="slurm",
        )
    return WorldInfo(0, 1, 0, "127.0.0.1", port, "single")


def export_slurm_env(env: dict[str, str] | None = None) -> None:
    """Under plain `srun python -m ...` (no torchrun), publish the torchrun variables so
    Accelerate and torch.distributed find the world. No-op when RANK is already set, and for a
    single task (a sweep's one-task jobs share nodes: a derived MASTER_PORT would clash between them)."""
    env = os.environ if env is None else env
    info = world_info(env)
    if info.source != "slurm" or info.world_size == 1:
        return
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
               MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))


def backend(cuda_available: bool | None = None) -> str:
    """nccl when every rank has a GPU, gloo otherwise (CPU runs, tests)."""
    import torch

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    return "nccl" if cuda else "gloo"


def is_initialized() -> bool:
    if "torch" not in sys.modules:      # nothing can have started a process group
        return False
    td = _torch_dist()
    return td.is_available() and td.is_initialized()


def init_process_group(timeout_s: float = 1800.0) -> WorldInfo:
    """Join the process group described by the environment (no-op for a single process)."""
    import datetime

    info = world_info()
    if info.world_size > 1 and not is_initialized():
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        _torch_dist().init_process_group(backend=backend(), rank=info.rank, world_size=info.world_size,
                                      timeout=datetime.timedelta(seconds=timeout_s))
    return info


def rank() -> int:
    return _torch_dist().get_rank() if is_initialized() else world_info().rank


def world_size() -> int:
    return _torch_dist().get_world_size() if is_initialized() else world_info().world_size


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        _torch_dist().barrier()


def _device_for_comm() -> torch.device:
    import torch

    if is_initialized() and _torch_dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    if not is_initialized():
        return t.clone()
    out = t.detach().to(_device_for_comm()).clone()
    _torch_dist().all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor on `t`'s device; `t` itself is unchanged)."""
    return _all_reduce(t, _torch_dist().ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `t` over ranks (a new tensor on `t`'s device)."""
    return _all_reduce(t, _torch_dist().ReduceOp.MAX)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list for a single process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * _torch_dist().get_world_size()
    _torch_dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The main rank's `obj` on every rank (decisions such as `resume=latest` are made once)."""
    if not is_initialized():
        return obj
    box = [obj]
    _torch_dist().broadcast_object_list(box, src=src)
    return box[0]
