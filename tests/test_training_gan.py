"""PatchGAN, GAN losses, VQGAN adaptive weight, DiffAugment, bCR, delayed start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmvae.gan import (
    DiffAugment,
    NLayerDiscriminator,
    adaptive_generator_weight,
    adopt_weight,
    bcr_loss,
    discriminator_loss,
    gan_active,
    generator_loss,
    hinge_d_loss,
    non_saturating_d_loss,
)


def _photo(size: int = 32, n: int = 2) -> torch.Tensor:
    from skimage import data

    t = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float()[None] / 127.5 - 1
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.repeat(n, 1, 1, 1)  # identical samples: per-sample draws must still differ


@pytest.mark.parametrize(("size", "expected"), [((256, 256), (30, 30)), ((64, 64), (6, 6)), ((128, 96), (14, 10))])
def test_patchgan_output_size(size, expected) -> None:
    d = NLayerDiscriminator(ndf=8)  # width does not change the geometry; keeps the test fast
    out = d(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *expected)


def test_patchgan_layout_and_errors() -> None:
    d = NLayerDiscriminator()  # reference widths: 64, 128, 256, 512 -> 1
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]  # no bias before BN
    assert 0.015 < convs[1].weight.std().item() < 0.025  # truncN(0, 0.02) init
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in NLayerDiscriminator(norm="group").modules())
    with pytest.raises(ValueError, match="H, W >= 32"):
        d(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="spectral")  # type: ignore[arg-type]


def test_hinge_and_non_saturating_values() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 1.5] -> mean 5/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 5 / 6))
    ns = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(ns.item())
    assert generator_loss(fake).item() == pytest.approx(-fake.mean().item())
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(F.softplus(-fake).mean().item())
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(fake, "wgan")  # type: ignore[arg-type]


def test_adaptive_weight_matches_hand_formula() -> None:
    torch.manual_seed(0)
    body = nn.Conv2d(3, 8, 3, padding=1)
    last = nn.Conv2d(8, 3, 3, padding=1)  # stands for decoder.conv_out
    disc = NLayerDiscriminator(ndf=4, n_layers=1)
    x = _photo(16)
    x_hat = last(torch.relu(body(x)))
    rec = (x_hat - x).abs().mean()
    g = generator_loss(disc(x_hat))
    w = adaptive_generator_weight(rec, g, last.weight)

    g_rec = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, last.weight, retain_graph=True)[0]
    expected = (g_rec.norm() / (g_gan.norm() + 1e-6)).clamp(0, 1e4)
    assert not w.requires_grad
    assert torch.equal(w, expected)
    assert w.item() > 0
    (rec + 0.5 * w * g).backward()  # graphs were retained for the caller
    assert last.weight.grad is not None

    # a GAN loss with (almost) no gradient at the last layer hits the 1e4 clamp
    x_hat2 = last(torch.relu(body(x)))
    w2 = adaptive_generator_weight((x_hat2 - x).abs().mean(), 1e-12 * x_hat2.sum(), last.weight)
    assert w2.item() == 1e4
    with pytest.raises(ValueError, match="does not require grad"):
        adaptive_generator_weight(rec, g, last.weight.detach())


def test_diffaugment_deterministic_per_sample_and_differentiable() -> None:
    aug = DiffAugment()
    x = _photo(32, n=4).requires_grad_(True)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == x.shape
    # the four inputs are identical; per-sample draws make the outputs differ
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[2], a[3])
    (a * torch.randn_like(a)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_diffaugment_components() -> None:
    x = _photo(40, n=3) * 0.5 + 0.5 + 0.1  # strictly positive, so zeros come only from the augmentation
    g = torch.Generator().manual_seed(0)
    assert torch.equal(DiffAugment(translation=0, cutout=0, color=False)(x, g), x)
    # cutout: a zeroed square of side 0.2 * 40 = 8 (fewer pixels if it is clipped at a border)
    cut = DiffAugment(translation=0, cutout=0.2, color=False)(x, g)
    zeros = (cut == 0).all(dim=1).flatten(1).sum(1)
    assert (zeros <= 64).all() and (zeros > 0).all()
    # translation: integer shifts up to 0.125 * 40 = 5 px with zero fill
    tr = DiffAugment(translation=0.125, cutout=0, color=False)(x, torch.Generator().manual_seed(3))
    for i in range(3):
        found = False
        for dy in range(-5, 6):
            for dx in range(-5, 6):
                shifted = torch.zeros_like(x[i])
                ys, yd = (slice(dy, None), slice(0, 40 - dy)) if dy >= 0 else (slice(0, 40 + dy), slice(-dy, None))
                xs, xd = (slice(dx, None), slice(0, 40 - dx)) if dx >= 0 else (slice(0, 40 + dx), slice(-dx, None))
                shifted[:, yd, xd] = x[i][:, ys, xs]
                found |= torch.equal(shifted, tr[i])
        assert found, f"sample {i} is not an integer translation within +-5 px"
    # colour: brightness/saturation/contrast change values but keep the image structure
    col = DiffAugment(translation=0, cutout=0, color=True)(x, g)
    assert not torch.allclose(col, x)
    with pytest.raises(ValueError, match="prob"):
        DiffAugment(prob=1.5)


def test_bcr_loss_and_discriminator_step() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=4, n_layers=2, norm="none")
    x = _photo(32, n=2)
    identity = DiffAugment(translation=0, cutout=0, color=False)
    assert bcr_loss(disc, x, identity).item() == 0.0
    aug = DiffAugment()
    g = torch.Generator().manual_seed(0)
    loss = bcr_loss(disc, x, aug, generator=g)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in disc.parameters())

    fake = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    total, parts = discriminator_loss(disc, x, fake, aug, bcr_weight=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(total.detach(), parts.gan + parts.bcr)
    assert parts._fields == ("gan", "bcr", "logits_real", "logits_fake")
    total.backward()
    assert fake.grad is None  # the fake images are detached for the discriminator
    _, parts0 = discriminator_loss(disc, x, fake, None, bcr_weight=0.0)
    assert parts0.bcr.item() == 0.0
    with pytest.raises(ValueError, match="needs an augment"):
        discriminator_loss(disc, x, fake, None, bcr_weight=1.0)


def test_delayed_start() -> None:
    assert not gan_active(4999, 5000) and gan_active(5000, 5000)
    assert adopt_weight(0.5, 10, 5000) == 0.0
    assert adopt_weight(0.5, 5000, 5000) == 0.5
