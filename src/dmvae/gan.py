"""Adversarial pieces of the tokenizer recipe (paper Eq. 10; reference ``train_tokenizer.py``).

- :class:`NLayerDiscriminator`: the pix2pix / VQGAN PatchGAN (ndf 64, 3 layers; 30x30 logits at 256^2).
- Losses: hinge and non-saturating, for the discriminator and the generator.
- :func:`adaptive_generator_weight`: VQGAN's balance ||grad_last L_rec|| / (||grad_last L_gan|| + 1e-6),
  clamped to [0, 1e4], taken w.r.t. the decoder's last layer (``conv_out.weight``).
- :class:`DiffAugment`: differentiable colour / translation / cutout augmentation (Zhao et al. 2020),
  with every draw per sample from an optional ``torch.Generator``.
- :func:`bcr_loss`: balanced-consistency regularisation MSE(D(aug2(x)), D(aug1(x))), gradients
  through both branches, as in the reference.
- :func:`gan_active` / :func:`adopt_weight`: the delayed GAN start (reference: step 5000).

The reference recipe, per iteration after ``disc_start_step``::

    rec, _ = rec_loss(x_hat, x)
    g = generator_loss(disc(augment(x_hat)))                # -D(DiffAug(x_hat)).mean()
    w = adaptive_generator_weight(rec, g, decoder.conv_out.weight)
    loss = rec + 0.5 * w * g
    ...
    d_loss, parts = discriminator_loss(disc, x, x_hat.detach(), augment, bcr_weight=1.0)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmvae.checks import check_int, check_range

__all__ = [
    "NLayerDiscriminator",
    "hinge_d_loss",
    "non_saturating_d_loss",
    "generator_loss",
    "adaptive_generator_weight",
    "DiffAugment",
    "bcr_loss",
    "discriminator_loss",
    "DiscriminatorLossBreakdown",
    "gan_active",
    "adopt_weight",
]

GANLossKind = Literal["hinge", "non_saturating"]


# ################################################################################################
#                                   PatchGAN discriminator
# ################################################################################################


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv4/s2 x n_layers -> conv4/s1 -> conv4/s1 to one logit per patch.

    Each logit sees a 70x70 receptive field; a 256^2 image gives (B, 1, 30, 30), any H, W >= 32 works
    (out = floor(H/2^n) - 2).

    Args:
        in_channels: image channels.
        ndf: width of the first layer; layer k has ndf * min(2^k, 8) channels.
        n_layers: number of stride-2 convolutions.
        norm: "batch" (reference: SyncBN under DDP; convert with
            ``nn.SyncBatchNorm.convert_sync_batchnorm``), "group" (32 groups; batch-size independent)
            or "none". Convolutions followed by a norm carry no bias.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                 norm: Literal["batch", "group", "none"] = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")
        n_layers = check_int("n_layers", n_layers, 1)

        def norm_layer(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c), c)
            return nn.Identity()

        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for k in range(1, n_layers + 1):
            prev, mult = mult, min(2**k, 8)
            stride = 2 if k < n_layers else 1  # the last widening conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.initialize_weights()

    def initialize_weights(self, std: float = 0.02) -> None:
        """Reference ``init_weights(0.02)``: conv weights ~ truncN(0, 0.02), biases 0, norms 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        min_size = 2 ** (self.n_layers - 1) * 8
        if x.ndim != 4 or min(x.shape[-2:]) < min_size:
            raise ValueError(
                f"NLayerDiscriminator expects (B, C, H, W) with H, W >= {min_size}, got {tuple(x.shape)}"
            )
        return self.main(x)  # (B, 1, H/2^n - 2, W/2^n - 2), e.g. 30x30 at 256^2


# ################################################################################################
#                                         losses
# ################################################################################################


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))]) = 0.5 * BCE with labels 1 / 0."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: Tensor, kind: GANLossKind = "hinge") -> Tensor:
    """Generator side: hinge -> -E[D(x_hat)] (the reference); non_saturating -> E[softplus(-D(x_hat))]."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"kind must be 'hinge' or 'non_saturating', got {kind!r}")


def adaptive_generator_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, *, max_weight: float = 1e4,
                              eps: float = 1e-6, sync: bool | None = None) -> Tensor:
    """VQGAN adaptive weight: ||d rec/d W|| / (||d gan/d W|| + eps), clamped to [0, max_weight], detached.

    ``last_layer`` is the decoder's final weight (reference: ``decoder.conv_out.weight``; under DDP
    pass the unwrapped module's parameter). Both losses must depend on it; the graphs are retained
    so the caller can still ``backward()``. The caller multiplies by the fixed factor (reference: 0.5).
    ``sync`` (default: when a process group of > 1 process exists) averages both gradients over the
    processes first, so every rank uses the weight of the global batch, as one process would; call
    it on every rank then.
    """
    if not last_layer.requires_grad:
        raise ValueError(
            "adaptive_generator_weight: last_layer does not require grad (is the decoder frozen?)"
        )
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    from dmvae.dist import all_reduce_mean, get_world_size

    if sync if sync is not None else get_world_size() > 1:
        g_rec, g_gan = all_reduce_mean(torch.stack([g_rec, g_gan])).unbind(0)
    w = g_rec.norm() / (g_gan.norm() + eps)
    return w.clamp(0.0, max_weight).detach()


# ################################################################################################
#                                       DiffAugment
# ################################################################################################


def _rand(shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Draw on the generator's device (CPU generators on CPU), then move: reproducible across devices.
    dev = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=dev).to(x.device, x.dtype)


def _randint(high: int, shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randint(0, high, shape, generator=generator, device=dev).to(x.device)


class DiffAugment(nn.Module):
    """Differentiable augmentation for discriminator inputs (reference: ``DiffAug(prob=1, cutout=0.2)``).

    In order: colour (brightness +U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5)),
    integer translation by up to ``translation`` x size (zero fill), cutout of a zeroed square of
    side ``cutout`` x size at a random centre. Every draw is per sample; with a ``generator`` the
    result is reproducible. Gradients flow to the input (all ops are affine masks / gathers).
    Works in float32 (the reference casts) and returns float32.

    Args:
        translation: max shift as a fraction of H and W (0 disables).
        cutout: side of the cutout square as a fraction of H and W (0 disables).
        color: apply the three colour jitters.
        prob: per-sample probability of augmenting at all (reference 1.0).
    """

    def __init__(
        self, translation: float = 0.125, cutout: float = 0.2, color: bool = True, prob: float = 1.0
    ) -> None:
        super().__init__()
        self.translation, self.cutout, self.color = translation, cutout, color
        self.prob = check_range("prob", prob, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"translation={self.translation}, cutout={self.cutout}, color={self.color}, prob={self.prob}"

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"DiffAugment expects (B, C, H, W), got {tuple(x.shape)}")
        x = x.float()
        b, _, h, w = x.shape
        out = x
        if self.color:
            out = out + (_rand((b, 1, 1, 1), out, generator) - 0.5)  # brightness
            m = out.mean(dim=1, keepdim=True)
            out = (out - m) * (_rand((b, 1, 1, 1), out, generator) * 2.0) + m  # saturation
            m = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - m) * (_rand((b, 1, 1, 1), out, generator) + 0.5) + m  # contrast
        if self.translation > 0:
            out = self._translate(out, generator)
        if self.cutout > 0:
            out = self._cutout(out, generator)
        if self.prob < 1.0:
            keep = (_rand((b, 1, 1, 1), out, generator) < self.prob).to(out.dtype)
            out = keep * out + (1 - keep) * x
        return out

    def _translate(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, _, h, w = x.shape
        sh, sw = int(h * self.translation + 0.5), int(w * self.translation + 0.5)
        ty = _randint(2 * sh + 1, (b, 1), x, generator) - sh  # (B, 1) in [-sh, sh]
        tx = _randint(2 * sw + 1, (b, 1), x, generator) - sw
        # out[b, :, i, j] = x[b, :, i + ty, j + tx], zero where the source falls outside the image
        src_y = torch.arange(h, device=x.device)[None] + ty  # (B, H)
        src_x = torch.arange(w, device=x.device)[None] + tx  # (B, W)
        valid = ((src_y >= 0) & (src_y < h))[:, :, None] & ((src_x >= 0) & (src_x < w))[:, None, :]
        flat = (src_y.clamp(0, h - 1)[:, :, None] * w + src_x.clamp(0, w - 1)[:, None, :])  # (B, H, W)
        idx = flat.flatten(1)[:, None].expand(-1, x.shape[1], -1)  # (B, C, H*W)
        out = x.flatten(2).gather(2, idx).view_as(x)
        return out * valid[:, None].to(x.dtype)

    def _cutout(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, _, h, w = x.shape
        ch, cw = int(h * self.cutout + 0.5), int(w * self.cutout + 0.5)
        cy = _randint(h, (b, 1), x, generator)  # centre row
        cx = _randint(w, (b, 1), x, generator)
        ys = torch.arange(h, device=x.device)[None] - (cy - ch // 2)  # (B, H) offset from box start
        xs = torch.arange(w, device=x.device)[None] - (cx - cw // 2)
        inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
        return x * (~inside)[:, None].to(x.dtype)


# ################################################################################################
#                             discriminator step, bCR, delayed start
# ################################################################################################


def bcr_loss(
    discriminator: nn.Module,
    x: Tensor,
    augment: DiffAugment,
    *,
    logits: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Balanced consistency regularisation: MSE(D(aug2(x)), D(aug1(x))).

    ``logits`` = D(aug1(x)) if already computed (the reference reuses the discriminator step's
    logits); otherwise aug1 is drawn here. aug2 is a fresh draw of the same augmentation. Gradients
    flow through both branches (as in the reference).
    """
    if logits is None:
        logits = discriminator(augment(x, generator))
    return F.mse_loss(discriminator(augment(x, generator)), logits)


class DiscriminatorLossBreakdown(NamedTuple):
    gan: Tensor  # hinge / non-saturating term
    bcr: Tensor  # consistency term (unweighted; 0 when bcr_weight == 0)
    logits_real: Tensor  # mean D(aug(x)), detached, for logging
    logits_fake: Tensor  # mean D(aug(x_hat)), detached


def discriminator_loss(
    discriminator: nn.Module,
    real: Tensor,
    fake: Tensor,
    augment: DiffAugment | None = None,
    *,
    kind: GANLossKind = "hinge",
    bcr_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, DiscriminatorLossBreakdown]:
    """One discriminator objective on ``cat[real, fake.detach()]`` (reference order).

    Returns ``(loss, breakdown)`` with loss = gan + bcr_weight * bcr; bCR needs ``augment``.
    """
    if kind not in ("hinge", "non_saturating"):
        raise ValueError(f"kind must be 'hinge' or 'non_saturating', got {kind!r}")
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} vs {tuple(fake.shape)}")
    x = torch.cat([real, fake.detach()])  # (2B, C, H, W)
    x_aug = augment(x, generator) if augment is not None else x
    logits = discriminator(x_aug)
    lr, lf = logits.chunk(2)
    gan = hinge_d_loss(lr, lf) if kind == "hinge" else non_saturating_d_loss(lr, lf)
    if bcr_weight > 0:
        if augment is None:
            raise ValueError("bcr_weight > 0 needs an augment (DiffAugment) to draw the second view")
        bcr = bcr_loss(discriminator, x, augment, logits=logits, generator=generator)
    else:
        bcr = logits.new_zeros(())
    loss = gan + bcr_weight * bcr
    return loss, DiscriminatorLossBreakdown(gan.detach(), bcr.detach(), lr.mean().detach(), lf.mean().detach())


def gan_active(step: int, start_step: int) -> bool:
    """The GAN terms are on from ``start_step`` (reference ``disc_start_step`` = 5000) onwards."""
    return step >= start_step


def adopt_weight(weight: float, step: int, start_step: int, value: float = 0.0) -> float:
    """``weight`` once ``step >= start_step``, else ``value`` (taming's ``adopt_weight``)."""
    return weight if step >= start_step else value

