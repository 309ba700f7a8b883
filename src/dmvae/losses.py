"""Reconstruction loss of the tokenizer recipe (paper Eq. 10 without the GAN term).

    L_rec = w_l1 * |x_hat - x|_1 + w_l2 * |x_hat - x|_2^2 + w_lpips * LPIPS(x_hat, x)

Reference weights: l1 1.0, l2 0.0, lpips 1.0 (``train_tokenizer.py`` and ``train_dmd.py``). Every
term is a mean (over elements for L1/L2, over samples for LPIPS) and is computed in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmvae.checks import check_range

__all__ = ["ReconstructionLoss", "ReconstructionLossBreakdown"]


class ReconstructionLossBreakdown(NamedTuple):
    """Unweighted terms (detached, for logging). A term whose weight is 0 is still reported for
    L1 / L2 (cheap) but LPIPS is then not computed and reported as NaN."""

    l1: Tensor
    l2: Tensor
    lpips: Tensor


class ReconstructionLoss(nn.Module):
    """``loss, parts = ReconstructionLoss()(x_hat, x)``; images in [-1, 1], (B, 3, H, W).

    Args:
        l1_weight: weight of the mean absolute error.
        l2_weight: weight of the mean squared error (reference 0).
        lpips_weight: weight of the mean LPIPS-VGG distance.
        lpips: an :class:`dmvae.lpips.LPIPS` instance to use; None builds ``LPIPS()`` (which looks
            for local / cached weights and raises a clear error if there are none) when
            ``lpips_weight > 0``.
    """

    def __init__(self, l1_weight: float = 1.0, l2_weight: float = 0.0, lpips_weight: float = 1.0,
                 lpips: nn.Module | None = None) -> None:
        super().__init__()
        self.l1_weight = check_range("l1_weight", l1_weight, 0.0)
        self.l2_weight = check_range("l2_weight", l2_weight, 0.0)
        self.lpips_weight = check_range("lpips_weight", lpips_weight, 0.0)
        if lpips is None and lpips_weight > 0:
            from dmvae.lpips import LPIPS

            lpips = LPIPS()
        self.lpips = lpips

    def extra_repr(self) -> str:
        return f"l1_weight={self.l1_weight}, l2_weight={self.l2_weight}, lpips_weight={self.lpips_weight}"

    def forward(self, reconstruction: Tensor, target: Tensor) -> tuple[Tensor, ReconstructionLossBreakdown]:
        if reconstruction.shape != target.shape:
            shapes = f"{tuple(reconstruction.shape)} and {tuple(target.shape)}"
            raise ValueError(f"reconstruction and target must have the same shape, got {shapes}")
        x_hat, x = reconstruction.float(), target.float()
        l1 = F.l1_loss(x_hat, x)
        l2 = F.mse_loss(x_hat, x)
        loss = self.l1_weight * l1 + self.l2_weight * l2
        if self.lpips_weight > 0:
            if self.lpips is None:
                raise ValueError("lpips_weight > 0 but no LPIPS module was given")
            lp = self.lpips(x_hat, x).mean()
            loss = loss + self.lpips_weight * lp
        else:
            lp = torch.full((), float("nan"), device=x.device)
        return loss, ReconstructionLossBreakdown(l1.detach(), l2.detach(), lp.detach())
