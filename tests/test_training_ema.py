"""EMA over torch.optim.swa_utils: the reference's update rule, exact resume, buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dmvae.ema import EMA


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _step(model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    x = torch.randn(16, 4, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_update_rule_matches_reference() -> None:
    torch.manual_seed(0)
    model = _net()
    ema = EMA(model, decay=0.9)
    # reference: W_ema starts as a copy, then W_ema <- d W_ema + (1 - d) W after every step
    hand = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        _step(model, opt, g)
        ema.update()
        for k, p in model.named_parameters():
            hand[k] = 0.9 * hand[k] + 0.1 * p.detach()
    ema_params = dict(ema.module.named_parameters())
    for k, v in hand.items():
        assert torch.allclose(ema_params[k], v, atol=1e-6), k
    online = dict(model.named_parameters())
    assert not torch.allclose(ema_params["3.weight"], online["3.weight"])  # the average lags the model
    assert ema.num_updates == 5
    # buffers (BatchNorm statistics) follow the online model by default
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.parameters())
    x = torch.randn(3, 4)
    assert torch.equal(ema(x), ema.module.eval()(x))


def test_resume_is_exact() -> None:
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.99)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        _step(model, opt, g)
        ema.update()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ema.state_dict(), g.get_state()))
    assert "ema_model.n_averaged" in saved[2]
    for _ in range(3):
        _step(model, opt, g)
        ema.update()
    uninterrupted = {k: v.clone() for k, v in ema.state_dict().items()}

    model2 = _net()  # fresh, different weights
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ema2 = EMA(model2, decay=0.99)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    ema2.load_state_dict(saved[2])
    g2 = torch.Generator().set_state(saved[3])
    for _ in range(3):
        _step(model2, opt2, g2)
        ema2.update()
    resumed = ema2.state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    assert ema2.num_updates == 6


def test_options_and_copy_to() -> None:
    model = _net()
    keep = EMA(model)
    avg = EMA(model, decay=0.5, buffers="average")
    model.train()
    model(torch.randn(8, 4))  # changes BN running stats
    keep.update()
    avg.update()
    assert torch.equal(keep.module[1].running_mean, model[1].running_mean)
    assert torch.allclose(avg.module[1].running_mean, 0.5 * model[1].running_mean)
    other = _net()
    keep.copy_to(other)
    assert torch.equal(other[0].weight, keep.module[0].weight)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="buffers"):
        EMA(model, buffers="mean")  # type: ignore[arg-type]
