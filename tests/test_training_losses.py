"""ReconstructionLoss: weighted sum and named breakdown."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dmvae.lpips import LPIPS
from dmvae.losses import ReconstructionLoss, ReconstructionLossBreakdown


def _photos() -> torch.Tensor:
    from skimage import data

    t = torch.from_numpy(data.coffee()[:, :400]).permute(2, 0, 1).float()[None] / 127.5 - 1
    return F.interpolate(t, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).repeat(2, 1, 1, 1)


def test_weighted_sum_and_breakdown() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp = LPIPS(pretrained=False)
    x = _photos()
    x_hat = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    fn = ReconstructionLoss(l1_weight=1.0, l2_weight=0.5, lpips_weight=2.0, lpips=lp)
    loss, parts = fn(x_hat, x)
    assert isinstance(parts, ReconstructionLossBreakdown)
    l1 = (x_hat - x).abs().mean()
    l2 = ((x_hat - x) ** 2).mean()
    lpv = lp(x_hat, x).mean()
    assert torch.allclose(parts.l1, l1) and torch.allclose(parts.l2, l2) and torch.allclose(parts.lpips, lpv)
    assert torch.allclose(loss, l1 + 0.5 * l2 + 2.0 * lpv)
    assert loss.ndim == 0 and not parts.l1.requires_grad
    loss.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_without_lpips() -> None:
    x = _photos()
    fn = ReconstructionLoss(lpips_weight=0.0)  # never builds LPIPS (no weights needed)
    assert fn.lpips is None
    loss, parts = fn(x * 0.9, x)
    assert torch.allclose(loss, (0.1 * x).abs().mean())
    assert math.isnan(parts.lpips.item())


def test_errors() -> None:
    with pytest.raises(ValueError, match="l2_weight"):
        ReconstructionLoss(l2_weight=-1.0, lpips_weight=0.0)
    fn = ReconstructionLoss(lpips_weight=0.0)
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))
