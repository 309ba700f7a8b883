import torch
from torch import nn

from dmvae._utils import unwrap_model
from dmvae.ema import EMA


def test_unwrap_model_strips_nested_wrappers_in_any_order():
    m = nn.Linear(2, 2)
    assert unwrap_model(m) is m
    assert unwrap_model(nn.DataParallel(m)) is m
    compiled = torch.compile(m)  # lazy: nothing is compiled until it is called
    assert unwrap_model(compiled) is m
    assert unwrap_model(nn.DataParallel(compiled)) is m
    assert unwrap_model(torch.compile(nn.DataParallel(m))) is m
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert unwrap_model(opt) is opt  # non-modules pass through


def test_ema_wraps_the_plain_module_under_dataparallel():
    m = nn.Linear(2, 2)
    ema = EMA(nn.DataParallel(m), decay=0.5)
    assert type(ema.module) is nn.Linear
    assert ema.online is m
