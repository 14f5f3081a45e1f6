"""torch.distributed in one place: which rank this process is, sums across ranks, rank-0-first sections,
DistributedDataParallel wrapping. Every function degrades to the single-process case when no process group
is initialized, so training code never branches on it.

Start several processes with torchrun (``torchrun --nproc_per_node=N -m gradgraph.cli train ...``): gloo on
CPU, NCCL on GPUs, one GPU per process (torchrun's ``LOCAL_RANK``)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["world", "is_main", "all_sum", "all_sum_tensor", "barrier", "main_first", "launched_by_torchrun",
           "process_group", "wrap"]


def world() -> tuple[int, int]:
    """(rank, world size), (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64; the values themselves without a group)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks (``t`` itself without a group); e.g. per-item results
    that each rank filled for its own shard of the items, zeros elsewhere."""
    if world()[1] == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. generates a dataset), then the other ranks (which find it done)."""
    rank, size = world()
    if size > 1 and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if size > 1 and rank == 0:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: str):
    """Under torchrun, join the process group for the block (NCCL for CUDA devices, gloo otherwise) and yield
    this process's device (``cuda`` becomes ``cuda:<LOCAL_RANK>``); otherwise yield ``device`` unchanged."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        yield device
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: str) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (one device per rank), else itself."""
    if world()[1] == 1:
        return model
    dev = torch.device(device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
