"""Tiny networks shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class MLPVelocity(nn.Module):
    """A tiny unconditional velocity net v(x, t) for (B, D) inputs."""

    num_classes = None

    def __init__(self, dim: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))
