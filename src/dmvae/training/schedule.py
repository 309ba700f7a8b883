"""Step-level helpers for the user's loop: two-time-scale schedule, warm-up, freezing, clipping, bf16.

Two-time-scale schedule (paper Sec. 3.3 / App. B.3; reference ``train_dmd.py``): the fake (student)
score model takes a flow-matching step on the detached latents at *every* iteration; the autoencoder
(and the discriminator) take a step only every ``autoencoder_every`` iterations (reference 5),
starting at step 0::

    sched = TwoTimeScaleSchedule(autoencoder_every=5)
    for step in range(start, total):
        if sched.autoencoder_step(step):
            ...  # VAE: rec + GAN + dm_weight * L_DM, then the discriminator
        ...      # fake model: flow-matching loss on lat.detach()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "TwoTimeScaleSchedule",
    "LinearWarmup",
    "linear_warmup",
    "freeze",
    "unfreeze",
    "set_trainable",
    "clip_grad_norm",
    "autocast",
]


@dataclass(frozen=True)
class TwoTimeScaleSchedule:
    """Which networks update at a given step.

    Args:
        autoencoder_every: the autoencoder (and discriminator) update every k-th step (reference 5);
            the fake model updates every step.
        offset: the autoencoder updates when ``(step - offset) % k == 0`` (reference 0).
    """

    autoencoder_every: int = 5
    offset: int = 0

    def __post_init__(self) -> None:
        if self.autoencoder_every < 1:
            raise ValueError(f"autoencoder_every must be >= 1, got {self.autoencoder_every}")

    def autoencoder_step(self, step: int) -> bool:
        return (step - self.offset) % self.autoencoder_every == 0


class LinearWarmup:
    """LR multiplier ``min(1, (step + 1) / warmup_steps)``, then constant.

    Unlike the reference's ``step / 1000``, the first step already trains (lr / warmup_steps instead
    of 0) and the full lr is reached at step ``warmup_steps - 1``. A class (not a lambda) so
    ``LambdaLR.state_dict()`` saves it and it pickles for DataLoader workers.
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def linear_warmup(optimizer: Optimizer, warmup_steps: int = 1000) -> LambdaLR:
    """``LambdaLR`` with :class:`LinearWarmup`; call ``scheduler.step()`` after each ``optimizer.step()``."""
    return LambdaLR(optimizer, LinearWarmup(warmup_steps))


# ------------------------------------------------------------------------------------ freezing

_ALIASES = {"bottleneck": ("bottleneck", "bottle_neck")}


def _get_part(model: nn.Module, name: str) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    for attr in _ALIASES.get(name, (name,)):
        part = getattr(model, attr, None)
        if isinstance(part, nn.Module):
            return part
    children = [n for n, _ in model.named_children()]
    raise AttributeError(f"{type(model).__name__} has no submodule {name!r}; its children are {children}")


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` on every parameter; returns the module."""
    return module.requires_grad_(False)


def unfreeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(True)


def set_trainable(model: nn.Module, **parts: bool) -> nn.Module:
    """Freeze / unfreeze submodules by attribute name, e.g. the tokenizer pretrain (frozen encoder)::

        set_trainable(vae, encoder=False, bottleneck=True, decoder=True)

    ``bottleneck`` also finds the reference name ``bottle_neck``. Unknown names raise, listing the
    model's children. Returns the model.
    """
    for name, trainable in parts.items():
        _get_part(model, name).requires_grad_(bool(trainable))
    return model


# ------------------------------------------------------------------------------------ clipping


def clip_grad_norm(
    parameters: nn.Module | Iterable[torch.Tensor], max_norm: float = 1.0, *, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """Clip the global grad norm (reference 1.0) and return the norm *before* clipping (a tensor;
    call ``.item()`` only when logging, to avoid a device sync every step)."""
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite)


# ------------------------------------------------------------------------------------ autocast


@contextlib.contextmanager
def autocast(
    device: str | torch.device = "cuda", enabled: bool | None = None, dtype: torch.dtype = torch.bfloat16
) -> Iterator[None]:
    """bf16 autocast for the reference's mixed-precision steps.

    ``enabled=None`` (default) turns it on for CUDA and leaves CPU in float32 (CPU bf16 is slow and
    changes numerics); ``enabled=True`` forces it on any device.
    """
    dev = torch.device(device)
    on = (dev.type == "cuda") if enabled is None else enabled
    if not on:
        yield
        return
    with torch.autocast(device_type=dev.type, dtype=dtype):
        yield
