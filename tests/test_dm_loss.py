"""DistributionMatchingLoss: behaviour beyond the reference parity (see test_dm_parity.py)."""

from __future__ import annotations

import pytest
import torch
from _nets import MLPVelocity
from torch import nn

from dmvae.dm_loss import (
    DistributionMatchingLoss,
    TRangeAnneal,
    paper_to_library_t_range,
)
from dmvae.metrics.distribution import energy_distance
from dmvae.priors import (
    GaussianMixturePrior,
    GaussianPrior,
    LearnedPrior,
    fit_reference_model,
)


def _fit(net, data, steps, lr=3e-3):
    return fit_reference_model(net, data, steps=steps, batch_size=256, lr=lr, shape=(2,),
                               generator=torch.Generator().manual_seed(0))


def _align(real, steps=300, seed=0):
    """Points from N((2.5, -2), 0.5^2) aligned to the reference with the DM loss; returns ED before/after."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(512, 2, generator=g) * 0.5 + torch.tensor([2.5, -2.0])
    fake = _fit(MLPVelocity(), start, 150)  # the fake starts as the score of the current points
    fake.requires_grad_(True).train()
    pts = nn.Parameter(start.clone())
    opt = torch.optim.Adam([pts], lr=0.03)
    fopt = torch.optim.Adam(fake.parameters(), lr=2e-3)
    loss_fn = DistributionMatchingLoss(real, fake)
    for _ in range(steps):
        loss, bd = loss_fn(pts, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for _ in range(2):  # fake score tracks the moving points
            fl, _ = loss_fn.fake_loss(pts, generator=g)
            fopt.zero_grad()
            fl.backward()
            fopt.step()
    ref = GaussianPrior((2,)).sample(512, generator=torch.Generator().manual_seed(99))
    return energy_distance(start, ref), energy_distance(pts.detach(), ref)


def test_dm_moves_shifted_gaussian_onto_gaussian_prior():
    before, after = _align(GaussianPrior((2,)))
    assert after <= 0.2 * before, (before, after)


def test_dm_with_learned_prior():
    torch.manual_seed(0)
    real = LearnedPrior(_fit(MLPVelocity(), GaussianPrior((2,)), 400), shape=(2,))
    before, after = _align(real)
    assert after <= 0.2 * before, (before, after)


def test_gradient_vanishes_when_distributions_match_and_points_to_prior():
    real = GaussianPrior((3,))
    z = GaussianPrior((3,), mean=1.5).sample(256, generator=torch.Generator().manual_seed(0))
    same = DistributionMatchingLoss(real, GaussianPrior((3,)))
    assert same.gradient(z).abs().max() < 1e-5
    shifted = DistributionMatchingLoss(real, GaussianPrior((3,), mean=1.5), normalize=False)
    g = shifted.gradient(z, generator=torch.Generator().manual_seed(1))
    assert (g.mean(0) > 0).all()  # descent (z - lr g) moves the points towards mean 0
    # normalize=False: g = x_hat_fake - x_hat_real exactly
    _, bd = shifted(z, t=0.5, noise=torch.zeros_like(z))
    assert torch.allclose(bd.grad, bd.pred_fake - bd.pred_real, atol=1e-6)


def test_surrogate_gradient_is_g_over_numel_and_loss_owns_nothing():
    real, fake = GaussianPrior((2, 2, 2)), GaussianPrior((2, 2, 2), mean=0.3)
    loss_fn = DistributionMatchingLoss(real, fake)
    assert list(loss_fn.parameters()) == [] and list(loss_fn.state_dict()) == ["step"]
    z = torch.randn(4, 2, 2, 2, requires_grad=True)
    loss, bd = loss_fn(z, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.allclose(z.grad * z.numel(), bd.grad, atol=1e-6)
    assert torch.allclose(loss, 0.5 * bd.grad.square().mean(), atol=1e-6)
    w = (z.detach() - bd.pred_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(bd.weight_factor, w)


def test_t_range_schedule_and_step_counter():
    assert paper_to_library_t_range((0.0, 0.5)) == (0.5, 1.0)
    sched = TRangeAnneal(start=(0.0, 1.0), end=(0.5, 1.0), steps=100)
    assert sched(0) == (0.0, 1.0) and sched(50) == (0.25, 1.0) and sched(1000) == (0.5, 1.0)
    loss_fn = DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,), mean=1.0), t_schedule=sched)
    z = torch.randn(4096, 2)
    _, bd = loss_fn(z)
    assert bd.t.min() < 0.05
    assert int(loss_fn.step) == 1
    loss_fn.step.fill_(100)
    _, bd = loss_fn(z)
    assert bd.t.min() >= 0.5 and bd.t.max() <= 1.0
    sd = loss_fn.state_dict()
    other = DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,)), t_schedule=sched)
    other.load_state_dict(sd)
    assert int(other.step) == 101
    fixed = DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,)), t_range=(0.2, 0.3))
    _, bd = fixed(z)
    assert bd.t.min() >= 0.2 and bd.t.max() <= 0.3


def _tiny_dit(num_classes=3):
    from dmvae.dit import LatentDiT, LatentDiTConfig

    net = LatentDiT(LatentDiTConfig(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=1,
                                    num_heads=2, num_classes=num_classes, class_dropout_prob=0.1))
    with torch.no_grad():  # the zero-initialised adaLN / output layers would hide the labels
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return net


def test_cfg_with_class_conditional_prior_and_dit():
    means = torch.randn(3, 4, 2, 2)
    real = GaussianMixturePrior((4, 2, 2), means=means, stds=0.5, class_conditional=True)
    fake = _tiny_dit()
    y = torch.tensor([0, 1, 2, 3])  # 3 = null label
    z = torch.randn(4, 4, 2, 2)
    t, noise = torch.rand(4), torch.randn(4, 4, 2, 2)
    _, bd1 = DistributionMatchingLoss(real, fake, cfg_scale=1.0)(z, y, t=t, noise=noise)
    _, bd3 = DistributionMatchingLoss(real, fake, cfg_scale=3.0)(z, y, t=t, noise=noise)
    tb = t[:, None, None, None]
    x_t = tb * z + (1 - tb) * noise
    v_c, v_u = real.velocity(x_t, t, y), real.velocity(x_t, t)
    assert torch.allclose(bd3.pred_real, x_t + (1 - tb) * (v_c + 2 * (v_c - v_u)), atol=1e-5)
    assert not torch.allclose(bd1.pred_fake, bd3.pred_fake)
    assert torch.allclose(bd3.pred_real[3], bd1.pred_real[3], atol=1e-6)  # null label: no guidance


def test_the_loss_is_the_method_only():
    """The research objectives of the 2-D study are a demo subclass, not a switch of the loss."""
    with pytest.raises(TypeError, match="objective"):
        DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,)), objective="real_score")  # type: ignore[call-arg]
    assert not hasattr(DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,))), "objective")


def test_bad_arguments_raise():
    p = GaussianPrior((2,))
    with pytest.raises(ValueError, match="cfg_scale"):
        DistributionMatchingLoss(p, p, cfg_scale=0.5)
    with pytest.raises(ValueError, match="t_range"):
        DistributionMatchingLoss(p, p, t_range=(0.6, 0.2))
    loss_fn = DistributionMatchingLoss(p, p)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        loss_fn(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="noise must have"):
        loss_fn(torch.randn(4, 2), noise=torch.randn(4, 3))
    nonull = _tiny_dit()
    from dmvae.dit import LatentDiT

    nonull = LatentDiT(nonull.config.replace(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="null class"):
        DistributionMatchingLoss(nonull, nonull, cfg_scale=2.0)(torch.randn(2, 4, 2, 2), torch.tensor([0, 1]))


@pytest.mark.parametrize("bad_t", [1.5, -0.5, float("nan")])
def test_time_outside_unit_interval_is_refused(bad_t):
    loss_fn = DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,), mean=1.0))
    z = torch.randn(4, 2)
    for call in (loss_fn, loss_fn.gradient, loss_fn.fake_loss):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            call(z, t=bad_t)
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            call(z, t=torch.tensor([0.5, bad_t, 0.2, 0.1]))
    assert int(loss_fn.step) == 0  # a refused call does not advance the schedule
    loss_fn(z, t=torch.tensor([0.0, 1.0, 0.5, 0.25]))  # the closed interval is fine


def test_fake_loss_noise_shape_is_checked():
    loss_fn = DistributionMatchingLoss(GaussianPrior((2,)), MLPVelocity())
    with pytest.raises(ValueError, match=r"noise must have the shape of x1 \(4, 2\), got \(4, 3\)"):
        loss_fn.fake_loss(torch.randn(4, 2), noise=torch.randn(4, 3))


def _tiny_point_dit(num_classes: int):
    """A one-token LatentDiT over (2, 1, 1): the fake score of 2-D points."""
    from dmvae.dit import LatentDiT, LatentDiTConfig

    return LatentDiT(LatentDiTConfig(input_size=1, patch_size=1, in_channels=2, hidden_size=32, depth=1,
                                     num_heads=1, num_classes=num_classes, class_dropout_prob=0.1))


@pytest.mark.parametrize("num_classes", [0, 1])
def test_vector_latents_with_a_dit_fake_score(num_classes):
    """(B, 2) latents against a (2,) prior and a LatentDiT over (2, 1, 1), conditional or not."""
    fake = _tiny_point_dit(num_classes)
    loss_fn = DistributionMatchingLoss(GaussianPrior((2,)), fake, cfg_scale=2.0 if num_classes else 1.0)
    z = torch.randn(8, 2, requires_grad=True)
    t, noise = torch.rand(8), torch.randn(8, 2)
    loss, bd = loss_fn(z, t=t, noise=noise)
    loss.backward()
    assert z.grad.shape == (8, 2) and bd.pred_fake.shape == (8, 2)
    with torch.no_grad():
        y = None if num_classes == 0 else torch.full((8,), fake.null_class)
        v = fake.eval()(bd.x_t.reshape(8, 2, 1, 1), t, y).reshape(8, 2)
    assert torch.allclose(bd.pred_fake, bd.x_t + (1 - t[:, None]) * v, atol=1e-6)
    fl, per = loss_fn.fake_loss(z, t=t, noise=noise)
    fl.backward()
    assert per.shape == (8,) and fake.final_layer.linear.weight.grad is not None


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []
        self.config = inner.config
        self.null_class, self.num_classes = inner.null_class, inner.num_classes

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        return self.inner(x, t, y)


def test_cfg_runs_one_batched_forward_per_network():
    real, fake = CountingModel(_tiny_dit()), CountingModel(_tiny_dit())
    loss_fn = DistributionMatchingLoss(real, fake, cfg_scale=3.0)
    loss_fn(torch.randn(4, 4, 2, 2), torch.tensor([0, 1, 2, 0]))
    assert real.batches == [8] and fake.batches == [8]  # conditional + null rows together


def test_fake_loss_mode_and_per_sample():
    fake = _tiny_dit()
    loss_fn = DistributionMatchingLoss(GaussianPrior((4, 2, 2)), fake)
    z = torch.randn(6, 4, 2, 2, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    fake.eval()
    m1, per = loss_fn.fake_loss(z, y, generator=torch.Generator().manual_seed(0))
    m2, _ = loss_fn.fake_loss(z, y, generator=torch.Generator().manual_seed(0))
    assert per.shape == (6,) and torch.equal(m1, m2) and not fake.training
    m1.backward()
    assert z.grad is None  # latents are detached: only the fake model learns
    assert fake.final_layer.linear.weight.grad is not None


def test_bf16_autocast_computes_gradient_in_float32():
    real = GaussianPrior((4, 2, 2))
    fake = _tiny_dit()
    loss_fn = DistributionMatchingLoss(real, fake, cfg_scale=2.0)
    z = torch.randn(4, 4, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    t, noise = torch.rand(4), torch.randn(4, 4, 2, 2)
    _, ref = loss_fn(z, y, t=t, noise=noise)
    zb = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, bd = loss_fn(zb, y, t=t, noise=noise)
        fl, _ = loss_fn.fake_loss(zb, y, t=t, noise=noise)
    assert loss.dtype == torch.float32 and bd.grad.dtype == torch.float32 and bd.t.dtype == torch.float32
    loss.backward()
    assert (bd.grad - ref.grad).abs().max() < 0.1 * ref.grad.abs().max()
    assert torch.isfinite(fl)


def test_ddp_wrapped_fake_model(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    fake = _tiny_dit()
    init = f"file://{tmp_path / 'pg'}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(fake)
        loss_fn = DistributionMatchingLoss(GaussianPrior((4, 2, 2)), ddp, cfg_scale=2.0)
        z = torch.randn(4, 4, 2, 2, requires_grad=True)
        y = torch.tensor([0, 1, 2, 0])
        loss, bd = loss_fn(z, y)  # reads ddp.module.config for the null label
        loss.backward()
        assert z.grad is not None
        fl, _ = loss_fn.fake_loss(z, y)
        fl.backward()
        assert fake.final_layer.linear.weight.grad is not None
    finally:
        dist.destroy_process_group()
