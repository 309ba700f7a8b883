import torch
from torch import nn

from dmvae._utils import eval_mode, unwrap_model
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


def test_eval_mode_restores_each_submodule_flag_even_after_an_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net.train()
    net[0].eval()  # a frozen part
    seen = []
    try:
        with eval_mode(net, lambda x: x):  # non-modules (plain callables) are ignored
            seen = [m.training for m in net.modules()]
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert seen == [False, False, False]
    assert [m.training for m in net.modules()] == [True, False, True]
