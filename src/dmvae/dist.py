"""``torch.distributed`` in one place: torchrun's environment, DDP wrapping, global-batch draws.

This module is the one home of rank / world size / torchrun environment handling in dmvae.

- :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``; multi-node through ``torchrun --nnodes N --rdzv-endpoint ...``
  or any ``env://`` launcher), picks nccl on GPU and gloo on CPU, and does nothing outside torchrun.
- :func:`wrap_ddp` wraps a trained module in ``DistributedDataParallel`` (identity in one process).
- :class:`GlobalBatchRandom` draws the random numbers of a step (noise, times, label drops) for the
  *global* batch from a generator seeded by (seed, step), identical on every rank, and hands each
  process the rows of its own samples. With :class:`~dmvae.training.sampler.ResumableDistributedSampler`
  (rank r holds global batch positions r, r + W, r + 2W, ...), N processes with batch b compute
  exactly the samples of one process with batch N*b.
- The collectives (:func:`all_reduce_mean`, ...) are safe with or without a process group.

:func:`all_reduce_gradients` is kept only as a documented fallback (gradient averaging without DDP's
hooks, e.g. for modules DDP cannot wrap); no example uses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "GlobalBatchRandom",
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main_process",
    "local_rows",
    "wrap_ddp",
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


def get_local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def wrap_ddp(module: nn.Module, device: torch.device | str | None = None, **kwargs) -> nn.Module:
    """``DistributedDataParallel(module)`` under a process group of > 1 process, else ``module``.

    Only the parameters that require grad when it is wrapped are synchronised (frozen encoders are
    left out), so freeze before wrapping. ``device`` (a CUDA device) sets ``device_ids``; keyword
    arguments go to DDP (e.g. ``find_unused_parameters``, ``static_graph``). Reach the plain module
    with :func:`dmvae._utils.unwrap_model`, e.g. for the adaptive GAN weight's last layer or for a
    forward pass whose parameters get no gradient (a frozen critic), which must not go through DDP.
    """
    if not (is_distributed() and get_world_size() > 1):
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module  # nothing to synchronise
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        kwargs.setdefault("device_ids", [dev.index if dev.index is not None else torch.cuda.current_device()])
    return DistributedDataParallel(module, **kwargs)


def local_rows(global_batch: torch.Tensor) -> torch.Tensor:
    """This process's rows of a tensor over the global batch: ``x[rank::world_size]``.

    Matches the sample placement of :class:`~dmvae.training.sampler.ResumableDistributedSampler`
    (and of ``DistributedSampler``): global position ``p`` lives on rank ``p % world_size``.
    """
    world = get_world_size()
    if global_batch.shape[0] % world:
        raise ValueError(f"global batch of {global_batch.shape[0]} rows does not split over {world} processes")
    return global_batch[get_rank() :: world]


class GlobalBatchRandom:
    """Random draws of one training step for the global batch, sliced to this process's samples.

    Every rank builds the same generator from ``(seed, step, stream)`` on ``device``, draws for all
    ``local_batch * world_size`` samples and keeps its rows (:func:`local_rows`), so the numbers a
    sample sees do not depend on the number of processes. Costs ``world_size`` times the draws of one
    process, which is negligible next to a training step.

        rnd = GlobalBatchRandom(seed, step, x.shape[0], device=x.device)
        noise = rnd.randn(*x.shape[1:])            # (b, C, H, W)
        t = rnd.rand()                              # (b,)
    """

    def __init__(self, seed: int, step: int, local_batch: int, *, device: torch.device | str = "cpu",
                 stream: int = 0) -> None:
        self.local_batch = int(local_batch)
        self.global_batch = self.local_batch * get_world_size()
        self.device = torch.device(device)
        # distinct, reproducible seed per (seed, step, stream); within int64
        mixed = (int(seed) * 1_000_003 + int(step) * 7919 + int(stream) * 104_729) % (2**62)
        self.generator = torch.Generator(device=self.device).manual_seed(mixed)

    def randn(self, *sample_shape: int) -> torch.Tensor:
        """(b, *sample_shape) standard normal, float32."""
        x = torch.randn((self.global_batch, *sample_shape), generator=self.generator, device=self.device)
        return local_rows(x)

    def rand(self, *sample_shape: int) -> torch.Tensor:
        """(b, *sample_shape) uniform on [0, 1), float32."""
        x = torch.rand((self.global_batch, *sample_shape), generator=self.generator, device=self.device)
        return local_rows(x)

    def bernoulli(self, p: float) -> torch.Tensor:
        """(b,) bool, true with probability ``p`` (e.g. label dropout for classifier-free guidance)."""
        return self.rand() < p


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
    """Fallback: average ``.grad`` of every parameter over processes, after ``backward()``.

    ``DistributedDataParallel`` (:func:`wrap_ddp`) is the engine the examples use: it buckets the
    gradients and overlaps their all-reduce with the backward pass. This function does the same
    arithmetic in one flat all-reduce after the backward pass, for modules that cannot be wrapped
    (e.g. a model whose set of used parameters changes from step to step without
    ``find_unused_parameters``). No example uses it. No-op in one process.
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
