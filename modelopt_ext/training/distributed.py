"""Process-group setup and the few collectives the trainer needs (gloo on CPU, NCCL on GPU).

Launch-agnostic: a plain `python -m modelopt_ext.train` is one process with no process group;
under `accelerate launch --multi_gpu` (or torchrun) the usual env vars (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) are set and a process group is initialised from them, across nodes too.
On a CPU machine use `accelerate launch --multi_gpu`: without it accelerate starts ONE process on CPU.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the one that writes shared files and logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """`all_reduce_sum` of `values` (a collective): lets telemetry sum over ranks without importing training."""
        return all_reduce_sum(values, self)


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the default process group from the launcher's env vars (no-op for a single process)."""
    if single_process_from_accelerate(os.environ):
        print(
            "warning: accelerate launch asked for several processes but started one (on a CPU-only machine "
            "pass --multi_gpu to get --num_processes processes); training on this one process",
            file=sys.stderr,
            flush=True,
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if cuda else {}),
        )
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def single_process_from_accelerate(environ: Mapping[str, str]) -> bool:
    """True when `accelerate launch --num_processes N>1` fell back to its single-process launcher.

    That launcher sets MASTER_ADDR only when more than one process was asked for, but no RANK/WORLD_SIZE
    (on a machine without GPUs it needs `--multi_gpu` to start N processes).
    """
    return (
        "ACCELERATE_MIXED_PRECISION" in environ and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ
    )


def shutdown_distributed() -> None:
    """Destroy the process group if this process created one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op for one process)."""
    if env.distributed:
        dist.barrier()


def all_reduce_mean_(tensors: list[torch.Tensor], env: DistEnv, bucket_numel: int = 1 << 24) -> None:
    """Average tensors over ranks in place (used for gradients).

    Tensors are packed into flat buckets (about `bucket_numel` elements each) so a large drafter pays a
    few collectives per step and a bounded extra buffer, not one collective per parameter.
    """
    if not env.distributed or not tensors:
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        bucket.append(t)
        size += t.numel()
        if size >= bucket_numel:
            _reduce_bucket(bucket, env)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, env)


def _reduce_bucket(bucket: list[torch.Tensor], env: DistEnv) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few scalars over ranks (float64 on the process device)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_tensor(t: torch.Tensor, env: DistEnv, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (moved through the process device, returned on t's device)."""
    if not env.distributed:
        return t
    moved = t.to(env.device).contiguous()
    dist.broadcast(moved, src=src)
    return moved.to(t.device)
