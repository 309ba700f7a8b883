"""dmvae.demo.objectives: the research objectives of the paper's 2-D study, a subclass of the
DM loss living with the demo (the library's DistributionMatchingLoss is Eq. 7-9 only)."""

from __future__ import annotations

import pytest
import torch
from _nets import MLPVelocity

from dmvae.demo.objectives import OBJECTIVES, ResearchObjectiveLoss
from dmvae.dm_loss import DistributionMatchingLoss
from dmvae.priors import GaussianPrior


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_runs_and_reaches_only_the_latents(objective):
    real = MLPVelocity()  # both networks' parameters require grad: none may receive any
    fake = MLPVelocity()
    loss_fn = ResearchObjectiveLoss(real, fake, objective=objective)
    z = torch.randn(16, 2, requires_grad=True)
    loss, bd = loss_fn(z, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    if objective not in ("fake_fm_target", "real_fm_target"):  # these move z without the nets' Jacobian
        assert z.grad.abs().sum() > 0
    for name, net in (("real", real), ("fake", fake)):
        leaked = [n for n, prm in net.named_parameters() if prm.grad is not None]
        assert not leaked, f"{objective} sent gradient into the {name} score network: {leaked}"
    g = loss_fn.gradient(z.detach(), t=bd.t, noise=None if objective == "dm" else torch.zeros(16, 2))
    assert g.shape == z.shape
    assert fake.training  # the DM call evaluated in eval mode and restored the mode


def test_reference_objective_names_are_aliases():
    a = ResearchObjectiveLoss(GaussianPrior((2,)), GaussianPrior((2,)), objective="score_teacher")
    assert a.objective == "real_score"
    with pytest.raises(ValueError, match="unknown objective"):
        ResearchObjectiveLoss(GaussianPrior((2,)), GaussianPrior((2,)), objective="nope")


def test_dm_objective_is_the_library_loss():
    """objective="dm" computes exactly what DistributionMatchingLoss computes."""
    real, fake = MLPVelocity(), MLPVelocity()
    z = torch.randn(8, 2)
    ours = ResearchObjectiveLoss(real, fake, objective="dmd")
    lib = DistributionMatchingLoss(real, fake)
    l1, b1 = ours(z, generator=torch.Generator().manual_seed(3))
    l2, b2 = lib(z, generator=torch.Generator().manual_seed(3))
    assert torch.equal(l1, l2) and torch.equal(b1.grad, b2.grad)
    assert torch.equal(ours.gradient(z, t=b1.t, noise=torch.zeros(8, 2)), lib.gradient(z, t=b1.t, noise=torch.zeros(8, 2)))
    assert "objective='dm'" in repr(ours)


def test_real_score_objective_ascends_the_real_log_density():
    """real_score moves z along +score_real: towards the real mean for a Gaussian prior."""
    real = GaussianPrior((2,), mean=3.0)
    loss_fn = ResearchObjectiveLoss(real, GaussianPrior((2,)), objective="real_score")
    z = torch.zeros(4, 2)
    g = loss_fn.gradient(z, t=0.5, noise=torch.zeros(4, 2))
    assert (g < 0).all()  # descent moves z by -g, i.e. towards mean 3
