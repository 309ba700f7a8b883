"""Tiny ``torch.distributed`` helpers: work unchanged in one process and under ``torchrun``.

``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), picks gloo on CPU and nccl on GPU, and does nothing outside torchrun. The other helpers
are safe to call whether or not a process group exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_reduce_gradients",
    "barrier",
    "cleanup_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0  # global rank
    world_size: int = 1
    local_rank: int = 0  # rank on this machine (selects the GPU)
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None = not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment, if present.

    Args:
        backend: override the backend (default: "nccl" when CUDA is available and ``device`` is not
            CPU, else "gloo").
        device: force "cpu" (e.g. to test gloo on a GPU machine); default cuda:LOCAL_RANK if available.
    """
    want_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = torch.device(device) if device is not None else torch.device("cuda" if want_cuda else "cpu")
        return DistInfo(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if want_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if want_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a new tensor; the input is untouched). Identity without a process group."""
    out = tensor.detach().clone()
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a new tensor). Identity without a process group."""
    return all_reduce_sum(tensor) / get_world_size()


@torch.no_grad()
def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Average ``.grad`` of every parameter over processes (what DDP does, without its hooks).

    Call after ``backward()`` and before clipping / ``optimizer.step()``. Equivalent to DDP for
    equal per-process batches and compatible with ``torch.autograd.grad`` tricks (the VQGAN
    adaptive weight) and frozen sub-modules; wrap in ``DistributedDataParallel`` instead when
    overlapping communication with the backward pass matters (large GPU runs). No-op in one process.
    """
    if not (is_distributed() and get_world_size() > 1):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier() -> None:
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()
