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
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, *, buffers: Literal["copy", "average"] = "copy"
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        model = unwrap_model(model)
        self.decay = decay
        self.buffers_mode = buffers
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

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """One EMA step from ``model`` (default: the wrapped module)."""
        src = unwrap_model(model) if model is not None else self.online
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
