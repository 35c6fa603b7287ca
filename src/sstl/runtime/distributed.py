"""Several processes (torchrun): the process group, and the collectives the training loop needs.

One process is the common case: every helper then returns at once, with no torch.distributed call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sstl.runtime.device import Runtime


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a torch.distributed group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def distributed(runtime: Runtime | None = None) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group when launched by torchrun; yield (rank, world size).

    torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; without them this is one process.
    Backend: nccl for CUDA runtimes, gloo on the CPU.
    """
    own = "WORLD_SIZE" in os.environ and "RANK" in os.environ and dist.is_available() and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if runtime is not None and runtime.cuda else "gloo")
    try:
        yield world()
    finally:
        if own:
            dist.destroy_process_group()


def to_rank0(obj: Any) -> list[Any]:
    """[every process's obj] on rank 0 (by rank); [] elsewhere. One process: [obj]."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def from_rank0(obj: Any) -> Any:
    """Rank 0's obj on every process."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(net: nn.Module, runtime: Runtime) -> nn.Module:
    """`net` wrapped in DistributedDataParallel under torchrun (gradients all-reduced), else itself."""
    if world()[1] == 1:
        return net
    ids = [runtime.device.index] if runtime.cuda else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)


def sync_buffers(model: nn.Module) -> None:
    """Average the statistics of BatchNorm layers that trained this epoch across processes, so every
    process validates (and saves) one model; frozen statistics are left bit for bit as they are."""
    rank, size = world()
    if size == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf.div_(size)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (one process's NaN stops them all, none hangs)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if world()[1] > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def agreed(score: tuple[float, float]) -> tuple[float, float]:
    """Rank 0's score on every process: early stopping and LR drops must not differ by a last bit."""
    if world()[1] == 1:
        return score
    t = torch.tensor(score, dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t[0]), float(t[1])
