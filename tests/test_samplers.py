"""Samplers: reference parity (sampler fixture), convergence order, SDE statistics, CFG batching."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.samplers import sample, sde_time_grid, time_grid

TOL = 1e-4


@pytest.fixture(scope="module")
def ema(fixtures_dir) -> LatentDiT:
    kwargs = json.loads((fixtures_dir / "sampler" / "manifest.json").read_text())["dit_constructor_kwargs"]
    return LatentDiT.from_pretrained(fixtures_dir / "dit" / "ckpt.pt", config=kwargs, use_ema=True)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(fixtures_dir / "sampler" / "sampler.safetensors")


CASES = {
    "a_euler": dict(method="euler"),
    "b_euler_cfg": dict(method="euler", cfg_scale=4.0, time_shift=2.5),
    "d_heun2": dict(method="heun"),
    "e_sde_euler": dict(method="euler-maruyama", last_step_size=0.04),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_parity(ema, ref, case, max_abs):
    kwargs = dict(CASES[case])
    if case == "e_sde_euler":
        kwargs["sde_noise"] = ref["e_sde_euler/brownian_normal"]
    times: list[float] = []
    # the reference's 8 grid points are 7 integration steps here
    x, traj = ema_sample(ema, ref, kwargs, times)
    expected_traj = ref[f"{case}/trajectory"]
    if case == "b_euler_cfg":  # the reference integrates the doubled batch; both halves agree
        assert max_abs(expected_traj[:, :4], expected_traj[:, 4:]) == 0
        expected_traj = expected_traj[:, :4]
    assert max_abs(x, ref[f"{case}/samples"]) <= TOL
    assert traj.shape == expected_traj.shape
    assert max_abs(traj, expected_traj) <= TOL
    assert torch.equal(torch.tensor(times, dtype=torch.float32), ref[f"{case}/eval_times"])


def ema_sample(ema, ref, kwargs, times):
    return sample(ema, ref["noise"], ref["labels"], num_steps=7, return_trajectory=True,
                  eval_times=times, **kwargs)


def test_dopri5_parity(ema, ref, max_abs):
    pytest.importorskip("torchdiffeq")
    x, traj = sample(ema, ref["noise"], ref["labels"], num_steps=7, method="dopri5",
                     return_trajectory=True)
    assert max_abs(x, ref["c_dopri5/samples"]) <= 1e-3
    assert max_abs(traj, ref["c_dopri5/trajectory"]) <= 1e-3


def test_time_grids_bitwise(ref):
    assert torch.equal(time_grid(7), ref["a_euler/time_grid"])  # includes the 1-ulp round trip
    assert not torch.equal(time_grid(7), torch.linspace(0, 1, 8))
    assert torch.equal(time_grid(7, 2.5), ref["b_euler_cfg/time_grid"])
    assert torch.equal(sde_time_grid(7, 0.04), ref["e_sde_euler/time_grid"])
    assert len(time_grid(249)) == 250


# ---- Gaussian target with a closed-form velocity ---------------------------------------------

MU, SIG = 1.0, 0.5


def gaussian_velocity(x, t, y):
    """E[x1 - x0 | x_t] for x1 ~ N(MU, SIG^2), x0 ~ N(0, 1)."""
    t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    var = t**2 * SIG**2 + (1 - t) ** 2
    return MU + (t * SIG**2 - (1 - t)) / var * (x - t * MU)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_convergence_order(method, order, max_abs):
    z = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(32, dtype=torch.long)
    exact = MU + SIG * z  # the ODE maps x0 = z to MU + SIG z
    errs = [max_abs(sample(gaussian_velocity, z, y, num_steps=n, method=method), exact)
            for n in (32, 64, 128)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    for r in ratios:
        assert 2**order * 0.85 < r < 2**order * 1.15, (method, errs, ratios)


def test_sde_reproduces_gaussian_statistics(max_abs):
    n = 20000
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(gaussian_velocity, z, torch.zeros(n, dtype=torch.long), num_steps=249,
               method="euler-maruyama", generator=torch.Generator().manual_seed(1))
    se_mean, se_std = SIG / n**0.5, SIG / (2 * n) ** 0.5
    assert abs(x.mean().item() - MU) < 5 * se_mean + 0.005
    assert abs(x.std().item() - SIG) < 5 * se_std + 0.01
    # and the noise actually mattered: the SDE sample is not the ODE sample
    ode = sample(gaussian_velocity, z, torch.zeros(n, dtype=torch.long), num_steps=64, method="heun")
    assert max_abs(x, ode) > 0.1


def test_sde_generator_reproducible():
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    run = lambda s: sample(gaussian_velocity, z, y, num_steps=10, method="euler-maruyama",  # noqa: E731
                           generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


# ---- CFG -----------------------------------------------------------------------------------------


class CountingModel(torch.nn.Module):
    def __init__(self, inner: LatentDiT) -> None:
        super().__init__()
        self.inner, self.batches = inner, []
        self.null_class = inner.null_class

    def forward(self, x, t, y):
        self.batches.append((x.shape[0], y.clone()))
        return self.inner(x, t, y)


def test_cfg_scale_one_is_conditional(ema, ref, max_abs):
    counted = CountingModel(ema)
    a = sample(counted, ref["noise"], ref["labels"], num_steps=3, cfg_scale=1.0)
    assert all(b == 4 for b, _ in counted.batches)  # no unconditional pass
    x = ref["noise"]
    grid = time_grid(3)
    with torch.no_grad():
        for k in range(3):
            x = x + (grid[k + 1] - grid[k]) * ema(x, grid[k].expand(4), ref["labels"])
    assert max_abs(a, x) == 0


def test_cfg_batches_cond_and_uncond_in_one_forward(ema, ref):
    counted = CountingModel(ema)
    sample(counted, ref["noise"], ref["labels"], num_steps=2, cfg_scale=3.0)
    assert len(counted.batches) == 2  # one forward per step
    for b, y in counted.batches:
        assert b == 8
        assert torch.equal(y[:4], ref["labels"]) and (y[4:] == ema.num_classes).all()


def test_legacy_three_channel_guidance_matches_reference_batch(ema, ref, max_abs):
    """guidance_channels=3 on the sampler == integrating the reference's doubled batch."""
    ours = sample(ema, ref["noise"], ref["labels"], num_steps=4, cfg_scale=4.0, guidance_channels=3)
    x = torch.cat([ref["noise"], ref["noise"]])
    y = torch.cat([ref["labels"], torch.full_like(ref["labels"], ema.num_classes)])
    grid = time_grid(4)
    with torch.no_grad():
        for k in range(4):
            v = ema.forward_with_cfg(x, grid[k].expand(8), y, 4.0, guidance_channels=3)
            x = x + (grid[k + 1] - grid[k]) * v
    assert max_abs(ours, x[:4]) <= 1e-6
    full = sample(ema, ref["noise"], ref["labels"], num_steps=4, cfg_scale=4.0)
    assert max_abs(ours, full) > 1e-3


def test_cfg_interval_outside_equals_unguided(ema, ref, max_abs):
    a = sample(ema, ref["noise"], ref["labels"], num_steps=3, cfg_scale=4.0, cfg_interval=(0.95, 1.0))
    b = sample(ema, ref["noise"], ref["labels"], num_steps=3, cfg_scale=1.0)
    assert max_abs(a, b) <= 1e-5  # grid times 0, 1/3, 2/3 are all outside


def test_bad_inputs(ema, ref):
    noise, labels = ref["noise"], ref["labels"]
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(ema, noise, labels, num_steps=2, method="rk4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_steps"):
        sample(ema, noise, labels, num_steps=0)
    with pytest.raises(ValueError, match="labels"):
        sample(ema, noise, labels[:2], num_steps=2)
    with pytest.raises(ValueError, match="time_shift"):
        sample(ema, noise, labels, num_steps=2, method="euler-maruyama", time_shift=2.5)
    with pytest.raises(ValueError, match="sde_noise"):
        sample(ema, noise, labels, num_steps=2, method="euler-maruyama", sde_noise=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="cfg_interval"):
        sample(ema, noise, labels, num_steps=2, cfg_scale=2.0, cfg_interval=(0.5,))
    with pytest.raises(ValueError, match="x must be"):
        sample(ema, noise[:, :4], labels, num_steps=2)
    no_null = LatentDiT(LatentDiTConfig(input_size=4, patch_size=1, in_channels=8, hidden_size=32,
                                        depth=1, num_heads=2, num_classes=10, class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="null"):
        sample(no_null, noise, labels, num_steps=2, cfg_scale=2.0)


def test_progress_and_list_labels_do_not_change_result():
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = sample(gaussian_velocity, z, [0, 0, 0], num_steps=3, method="heun", progress=True)
    b = sample(gaussian_velocity, z, torch.zeros(3, dtype=torch.long), num_steps=3, method="heun")
    assert torch.equal(a, b)


# ---- memory, host syncs, unconditional models -----------------------------------------------------


def test_sde_without_trajectory_holds_no_past_states():
    """return_trajectory=False must not keep every SDE state alive (250 latent batches at the
    release setting): while sampling, at most a couple of earlier states may still exist."""
    import weakref

    seen: list[weakref.ref] = []
    alive_max = 0

    def model(x, t, y):
        nonlocal alive_max
        alive_max = max(alive_max, sum(r() is not None for r in seen))
        seen.append(weakref.ref(x))
        return gaussian_velocity(x, t, y)

    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    x = sample(model, z, y, num_steps=30, method="euler-maruyama", generator=torch.Generator().manual_seed(1))
    assert alive_max <= 3, alive_max
    seen.clear()
    x2, traj = sample(model, z, y, num_steps=30, method="euler-maruyama", return_trajectory=True,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and traj.shape == (31, 4, 1, 2, 2) and torch.equal(traj[-1], x2)


class _NoHostSync:
    """Makes every device->host read of a tensor raise while ``armed``."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.armed = False
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def guard(t, *a, _orig=original, _name=name, **k):
                if self.armed:
                    raise AssertionError(f"host sync inside the sampling loop: Tensor.{_name}")
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, guard)


@pytest.mark.parametrize("kwargs", [
    dict(method="euler"),
    dict(method="heun", cfg_scale=3.0),
    dict(method="euler", cfg_scale=3.0, cfg_interval=(0.3, 0.8)),
    dict(method="euler-maruyama", cfg_scale=2.0),
])
def test_no_host_sync_inside_the_loop(ema, ref, monkeypatch, kwargs, max_abs):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the SDE noise)
    expected = sample(ema, ref["noise"], ref["labels"], num_steps=5, generator=gen(), **kwargs)
    guard = _NoHostSync(monkeypatch)
    calls = []
    forward = ema.forward

    def spy(x, t, y=None, **kw):
        assert isinstance(t, torch.Tensor) and t.shape == (x.shape[0],)  # t is a tensor, every step
        calls.append(x.shape[0])
        guard.armed = True  # from the first model call on, nothing may read a tensor on the host
        return forward(x, t, y, **kw)

    monkeypatch.setattr(ema, "forward", spy)
    x = sample(ema, ref["noise"], ref["labels"], num_steps=5, generator=gen(), **kwargs)
    guard.armed = False
    assert max_abs(x, expected) <= 1e-5 and len(calls) >= 5


def test_cfg_interval_runs_the_unconditional_half_only_inside(ema, ref):
    counted = CountingModel(ema)
    sample(counted, ref["noise"], ref["labels"], num_steps=4, cfg_scale=3.0, cfg_interval=(0.3, 0.8))
    # grid 0, .25, .5, .75 (1 is never evaluated): guided (8 rows) only at .5 and .75
    assert [b for b, _ in counted.batches] == [4, 4, 8, 8]


def test_labels_none_unconditional_and_null_class():
    from dmvae.dit import LatentDiT, LatentDiTConfig

    cfg = LatentDiTConfig(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=1,
                          num_heads=2, num_classes=0)
    uncond = LatentDiT(cfg).eval()
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    x = sample(uncond, noise, num_steps=2)
    assert x.shape == noise.shape and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="unconditional"):
        sample(uncond, noise, torch.zeros(3, dtype=torch.long), num_steps=2)
    cond = LatentDiT(cfg.replace(num_classes=5)).eval()
    with torch.no_grad():
        for i, prm in enumerate(cond.parameters()):
            prm.normal_(0, 0.2, generator=torch.Generator().manual_seed(i))
    a = sample(cond, noise, None, num_steps=2)  # None: the null class (unconditional branch)
    b = sample(cond, noise, torch.full((3,), 5), num_steps=2)
    assert torch.equal(a, b)
