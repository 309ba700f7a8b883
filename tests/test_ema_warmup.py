"""EMA warm-up (timm ModelEmaV3's schedule): off by default, right at every run length when on."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dmvae.ema import EMA


def _train(ema: EMA, model: nn.Module, steps: int, lr: float = 0.05) -> list[torch.Tensor]:
    """SGD towards a fixed target; returns the online weights after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    target = torch.full_like(model.weight, 3.0)
    seen = []
    for _ in range(steps):
        loss = (model.weight - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        seen.append(model.weight.detach().clone())
    return seen


def test_warmup_follows_the_documented_formula() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 3, bias=False)
    ema = EMA(model, decay=0.9999, warmup=True, warmup_power=0.75, warmup_gamma=2.0)
    start = model.weight.detach().clone()
    seen = _train(ema, model, 6)
    hand = start
    for k, w in enumerate(seen, start=1):
        d = min(0.9999, 1 - (1 + (k - 1) / 2.0) ** -0.75)
        assert ema.decay_at(k) == pytest.approx(d)
        hand = d * hand + (1 - d) * w
    assert torch.allclose(ema.module.weight, hand, atol=1e-6)
    assert ema.decay_at(1) == 0.0  # the first update copies the online weights
    assert ema.num_updates == 6 and ema.current_decay == pytest.approx(ema.decay_at(7))


def test_warmup_reaches_the_fixed_decay_and_is_capped_by_it() -> None:
    ema = EMA(nn.Linear(2, 2), decay=0.99, warmup=True)  # power 2/3, gamma 1
    assert ema.decay_at(31) == pytest.approx(1 - 31 ** (-2 / 3))  # ~0.9
    assert ema.decay_at(10_000) == 0.99
    decays = [ema.decay_at(k) for k in range(1, 2000)]
    assert all(a <= b for a, b in itertools.pairwise(decays))


def test_without_warmup_the_decay_is_fixed_from_the_first_update() -> None:
    model = nn.Linear(3, 3, bias=False)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    (w,) = _train(ema, model, 1)
    assert ema.decay_at(1) == 0.9 and ema.decay_at(10**6) == 0.9
    assert torch.allclose(ema.module.weight, 0.9 * start + 0.1 * w)


def test_a_short_run_with_warmup_ends_near_the_trained_weights() -> None:
    """The failure of issue 21: a 300-step run with decay 0.9999 keeps ~97 % of the initial
    weights; with warm-up the average sits near the trained weights."""
    torch.manual_seed(0)
    runs = {}
    for warm in (False, True):
        model = nn.Linear(4, 4, bias=False)
        start = model.weight.detach().clone()
        ema = EMA(model, decay=0.9999, warmup=warm)
        _train(ema, model, 300)
        moved = (ema.module.weight - start).norm() / (model.weight.detach() - start).norm()
        runs[warm] = float(moved)
    assert runs[False] < 0.05  # almost the initial weights
    assert runs[True] > 0.9  # almost the trained weights


def test_warmup_resumes_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 3, bias=False)
    ema = EMA(model, decay=0.999, warmup=True)
    _train(ema, model, 4)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    twin_model = nn.Linear(3, 3, bias=False)
    twin_model.load_state_dict(model.state_dict())
    twin = EMA(twin_model, decay=0.999, warmup=True)
    twin.load_state_dict(state)
    assert twin.num_updates == 4
    _train(ema, model, 3)
    _train(twin, twin_model, 3)
    assert torch.equal(ema.module.weight, twin.module.weight)


@pytest.mark.parametrize("kwargs", [{"warmup_power": 0.0}, {"warmup_gamma": -1.0}])
def test_bad_warmup_shape_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="warmup_power and warmup_gamma"):
        EMA(nn.Linear(2, 2), warmup=True, **kwargs)
