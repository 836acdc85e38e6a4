"""torch.distributed set-up: ``torchrun`` (env://) or SLURM variables under ``srun``.

NCCL on GPU, gloo on CPU. Without either launcher the run is a single process.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dino_vos.device import resolve_device
from dino_vos.errors import DinoVosError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created_group: bool = False  # this process initialised the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def _env_from_slurm() -> bool:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM (one task per GPU under ``srun``)."""
    if "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT + job % 10000))
    return True


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (or run as a single process)."""
    if dist.is_available() and dist.is_initialized():  # set up by the caller
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistInfo(rank, world, local, _device_for(device, local, world), False)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched and not _env_from_slurm():
        return DistInfo(device=resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    target = _device_for(device, local, world)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    except (RuntimeError, ValueError) as exc:
        raise DinoVosError(
            f"cannot join the process group (rank {rank} of {world}, backend {backend}): "
            f"{str(exc).splitlines()[0]}; check MASTER_ADDR/MASTER_PORT"
        ) from exc
    return DistInfo(rank, world, local, target, True)


def _device_for(device: str, local_rank: int, world: int) -> torch.device:
    target = resolve_device(device)
    if target.type == "cuda" and target.index is None and world > 1:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return target


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if this process created it."""
    if info.created_group and dist.is_initialized():
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list in a single process)."""
    if not is_enabled():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_enabled():
        dist.barrier()
