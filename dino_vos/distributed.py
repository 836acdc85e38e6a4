"""torch.distributed in one place: launch environment, process group, sharding and gathering.

Runs under ``torchrun`` (env://) or ``srun`` (SLURM variables are turned into torchrun's), NCCL
on GPU and gloo on CPU; without a launcher everything is a single process and every helper is a
no-op. Used by ``eval davis`` (sequence shards), the image baselines (feature shards) and
pretraining (DDP).
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist

from dino_vos.device import resolve_device
from dino_vos.errors import DinoVosError

DEFAULT_PORT = 29500
#: Ranks that only meet to merge results wait this long for the slowest shard.
GATHER_TIMEOUT = timedelta(days=3)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False  # this process initialised the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> tuple[int, int]:
    """(rank, world size) that the launcher set in the environment; (0, 1) without one."""
    _launched()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str) -> str:
    """Under a launcher with several ranks, ``auto``/``cuda`` become ``cuda:<LOCAL_RANK>``."""
    _, world = launch_env()
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


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


def _launched() -> bool:
    """True under torchrun (RANK/WORLD_SIZE set) or srun with several tasks."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or _env_from_slurm()


def _device_for(device: str, local_rank: int, world: int) -> torch.device:
    target = resolve_device(device)
    if target.type == "cuda" and target.index is None and world > 1:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return target


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (or run as a single process)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if is_enabled():  # set up by the caller
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(rank, world, local, _device_for(device, local, world), False)
    if not _launched() or int(os.environ["WORLD_SIZE"]) <= 1:
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


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if this process created it."""
    if info.created_group and is_enabled():
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if is_enabled() else (0, 1)


def world_size() -> int:
    return world_info()[1]


def barrier() -> None:
    if is_enabled():
        dist.barrier()


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


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere), over a gloo group of the launch.

    For jobs whose ranks work independently and only meet at the end: the group is created
    here when none exists (and destroyed again), with a timeout long enough for the slowest
    shard.
    """
    rank, world = launch_env()
    if world <= 1:
        return [obj]
    created = not is_enabled()
    if created:
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
        group = None
    else:
        group = cast(dist.ProcessGroup, dist.new_group(backend="gloo", timeout=GATHER_TIMEOUT))
    try:
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(obj, gathered, dst=0, group=group)
    finally:
        if created:
            dist.destroy_process_group()
    return gathered


def shard_range(total: int, rank: int, world: int) -> range:
    """The contiguous block of ``total`` items that ``rank`` of ``world`` handles."""
    per_rank = math.ceil(total / world) if total else 0
    return range(min(total, rank * per_rank), min(total, (rank + 1) * per_rank))


def shard_balanced(costs: Sequence[int], rank: int, world: int) -> list[int]:
    """Indices this rank handles: costliest first to the least-loaded rank, in input order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    loads = [0] * world
    owner: dict[int, int] = {}
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(world), key=lambda r: (loads[r], r))
        owner[index] = target
        loads[target] += costs[index]
    return [i for i in range(len(costs)) if owner[i] == rank]


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's :func:`shard_range` block into (total, ...) on every rank."""
    rank, world = world_info()
    if world == 1:
        return local
    per_rank = math.ceil(total / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    pieces = [part[: len(shard_range(total, r, world))] for r, part in enumerate(parts)]
    return torch.cat(pieces)
