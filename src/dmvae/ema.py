"""Exponential moving average of a model's weights, built on ``torch.optim.swa_utils.AveragedModel``.

    ema = EMA(model, decay=0.9999)
    for batch in loader:
        ...; opt.step()
        ema.update()          # W_ema <- decay * W_ema + (1 - decay) * W
    ema(x)                    # runs the averaged copy; ema.module is that copy (save it, sample with it)

Semantics match the reference's ``update_ema`` (decay 0.9999, every step, over all parameters,
the average starting from the weights at wrap time): ``AveragedModel`` alone would *copy* the
weights at the first update, so the counter starts at 1 here. Buffers (e.g. BatchNorm statistics) are
copied from the online model at each update (``buffers="copy"``, AveragedModel's behaviour) or
averaged like the parameters (``"average"``). The reference leaves the EMA's buffers at their initial
values; for DMVAE and LatentDiT, whose buffers are constants, that is the same as copying.
The update counter lives in a buffer, so ``state_dict()`` / ``load_state_dict()`` resume exactly.

Warm-up (``warmup=True``, off by default so that the reference's semantics hold): with a fixed decay
of 0.9999 the average of a 300-step run is still ~97 % the weights at wrap time. With warm-up, the
k-th update (k = 1, 2, ...) uses the decay of timm's ``ModelEmaV3(use_warmup=True)``::

    d_k = min(decay, 1 - (1 + (k - 1) / gamma) ** -power)      # gamma = 1, power = 2/3 by default

so the first update copies the weights (d_1 = 0) and the decay grows with the count: 0.9 after 31
updates, 0.99 after 1,000, 0.999 after 31,600, the full 0.9999 after 10^6 (``power=3/4`` reaches
0.999 after 10,000 for shorter runs; ``gamma = power = 1`` is the running mean of all updates).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dmvae._utils import unwrap_model

__all__ = ["EMA"]


class EMA(nn.Module):
    """Wraps ``model`` (kept by reference as ``online``) and holds a frozen averaged copy.

    Args:
        model: the module being trained (unwrap DDP first, or pass the DDP module: ``.module`` is used).
        decay: EMA decay per update (reference 0.9999).
        buffers: "copy" | "average" (see module docstring).
        warmup: let the effective decay grow with the update count (see module docstring); off by
            default (the reference's fixed decay).
        warmup_power, warmup_gamma: the warm-up's shape, as in timm (defaults 2/3 and 1).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        *,
        buffers: Literal["copy", "average"] = "copy",
        warmup: bool = False,
        warmup_power: float = 2 / 3,
        warmup_gamma: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        if not (warmup_power > 0 and warmup_gamma > 0):
            raise ValueError(f"warmup_power and warmup_gamma must be > 0, got {warmup_power} and {warmup_gamma}")
        model = unwrap_model(model)
        self.decay = decay
        self.buffers_mode = buffers
        self.warmup = bool(warmup)
        self.warmup_power = float(warmup_power)
        self.warmup_gamma = float(warmup_gamma)
        self.ema_model = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=(buffers == "average")
        )
        self.ema_model.n_averaged.fill_(1)  # W_0^ema = W at wrap time; every update is an EMA step
        self.ema_model.requires_grad_(False)
        self.ema_model.eval()
        object.__setattr__(self, "online", model)  # not a submodule: not in state_dict / .parameters()

    @property
    def module(self) -> nn.Module:
        """The averaged copy (same class and state-dict keys as the online model)."""
        return self.ema_model.module

    @property
    def num_updates(self) -> int:
        return int(self.ema_model.n_averaged.item()) - 1

    def decay_at(self, k: int) -> float:
        """The decay the ``k``-th update (k >= 1) uses: ``decay`` without warm-up, else
        ``min(decay, 1 - (1 + (k - 1) / gamma) ** -power)``."""
        if k < 1:
            raise ValueError(f"updates are counted from 1, got {k}")
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + (k - 1) / self.warmup_gamma) ** -self.warmup_power)

    @property
    def current_decay(self) -> float:
        """The decay of the next update."""
        return self.decay_at(self.num_updates + 1)

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """One EMA step from ``model`` (default: the wrapped module)."""
        src = unwrap_model(model) if model is not None else self.online
        if self.warmup:  # the counter is read back (AveragedModel reads it too, to test for 0)
            self.ema_model.multi_avg_fn = get_ema_multi_avg_fn(self.current_decay)
        self.ema_model.update_parameters(src)  # also copies buffers when buffers == "copy"

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the wrapped module)."""
        dst = unwrap_model(model) if model is not None else self.online
        dst.load_state_dict(self.module.state_dict(), strict=True)

    def train(self, mode: bool = True) -> EMA:
        # The averaged copy is always in eval mode (no dropout, frozen BN statistics).
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ema_model(*args, **kwargs)
