"""Warm-up, two-time-scale schedule, freezing, clipping, autocast."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dmvae.training.schedule import (
    LinearWarmup,
    TwoTimeScaleSchedule,
    autocast,
    clip_grad_norm,
    freeze,
    linear_warmup,
    set_trainable,
    unfreeze,
)


def test_warmup_does_not_start_at_zero_and_resumes() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-4)
    sched = linear_warmup(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])  # reference would start at 0
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # the warm-up object's state is plain data
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched2 = linear_warmup(opt2, warmup_steps=999)
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0].warmup_steps == 4 and sched2.last_epoch == 6
    assert LinearWarmup(0)(0) == 1.0
    with pytest.raises(ValueError):
        LinearWarmup(-1)


def test_two_time_scale() -> None:
    s = TwoTimeScaleSchedule(autoencoder_every=5)
    assert [t for t in range(20) if s.autoencoder_step(t)] == [0, 5, 10, 15]
    assert [t for t in range(7) if TwoTimeScaleSchedule(3, offset=1).autoencoder_step(t)] == [1, 4]
    with pytest.raises(ValueError):
        TwoTimeScaleSchedule(0)


class _VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.bottle_neck = nn.Linear(2, 2)  # reference name; "bottleneck" finds it
        self.decoder = nn.Linear(2, 2)


def test_freeze_helpers() -> None:
    vae = _VAE()
    set_trainable(vae, encoder=False, bottleneck=True, decoder=True)
    assert [p.requires_grad for p in vae.encoder.parameters()] == [False, False]
    assert all(p.requires_grad for p in vae.bottle_neck.parameters())
    freeze(vae.decoder)
    assert not any(p.requires_grad for p in vae.decoder.parameters())
    unfreeze(vae)
    assert all(p.requires_grad for p in vae.parameters())
    with pytest.raises(AttributeError, match="children are"):
        set_trainable(vae, head=False)


def test_clip_grad_norm() -> None:
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    norm = clip_grad_norm([p], 1.0)
    assert norm.item() == pytest.approx(6.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(nn.Linear(2, 2), 1.0).item() == 0.0  # no grads yet


def test_autocast() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu"):
        assert (a @ b).dtype == torch.float32  # no-op on CPU unless requested
    with autocast("cpu", enabled=True):
        assert (a @ b).dtype == torch.bfloat16
