"""The distribution-matching (DM) loss: pull the aggregate latent distribution q(z) towards p_r(z).

Paper Sec. 3.1 (Eq. 7-9) and the reference ``train_dmd.py``. Two velocity networks share one
noisy latent: the frozen *real* score (the reference prior: a :class:`~dmvae.priors.ReferencePrior`
or a LatentDiT fitted on p_r) and the online *fake* score that tracks q(z). The encoder is pushed
along the difference of their clean-sample predictions; no gradient goes through either network.

Time convention (the library's and the reference code's; the paper's is reversed, s = 1 - t), with
the path and the clean-sample prediction of :mod:`dmvae.transport`::

    x_t = t z + (1 - t) eps          t = 1: data, t = 0: noise           (transport.interpolate)
    x_hat = x_t + (1 - t) v(x_t, t)  predicted clean latent               (transport.data_from_velocity)

**Eq. 7** (:meth:`DistributionMatchingLoss.fake_loss`): the fake score learns q(z) by flow
matching on detached latents, ``L_fm = E |v_fake(x_t, t) - (sg z - eps)|^2``.

**Eq. 8** (:meth:`DistributionMatchingLoss.forward`), exactly as the reference computes it (DMD's
per-sample weighting)::

    v_r, v_f  = real(x_t, t, y), fake(x_t, t, y)             (no grad, both in eval mode)
    CFG on both (each with its own null label): v = u + s (c - u)     (transport.guided_velocity)
    p_real, p_fake = z - x_hat_r, z - x_hat_f
    g = nan_to_num((p_real - p_fake) / mean_{C,H,W} |p_real|)  (per-sample DMD normaliser)   (E1)
    L_DM = 0.5 mean((z - sg(z - g))^2)  =>  dL_DM/dz = g / numel(z)                          (E2)

Since s_fake - s_real is proportional to x_hat_fake - x_hat_real (score = (t v - x_t)/(1 - t)),
descending L_DM moves z towards the real prediction and away from the fake one, i.e. it lowers
KL(q || p_r). ``normalize=False`` drops the divisor of (E1) (the reference's 2-D toy).

**Eq. 9**: the encoder's total loss is ``L_recon + gamma L_fm + lambda L_DM``; this module gives
the last two terms, the reconstruction loss is :mod:`dmvae.losses`.

A paper-convention range [a, b] (t = 1 noise) is the library range [1 - b, 1 - a]; the paper's
annealing "[0, 1] -> [0, 0.5]" (Table 2) is therefore ``TRangeAnneal(start=(0, 1), end=(0.5, 1))``.

The other objectives of the paper's 2-D study (Fig. 3: real-score or fake-score maximisation,
score-difference and loss-difference minimisation) are not part of the method: they live with that
study, as a subclass of this loss (:class:`dmvae.demo.objectives.ResearchObjectiveLoss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dmvae._utils import eval_mode, unwrap_model
from dmvae.transport import (
    FlowMatching,
    batch_time,
    data_from_velocity,
    guided_velocity,
    interpolate,
    resolve_labels,
)

__all__ = [
    "DMBreakdown",
    "DistributionMatchingLoss",
    "TRangeAnneal",
    "paper_to_library_t_range",
    "surrogate_loss",
]


def paper_to_library_t_range(paper_range: tuple[float, float]) -> tuple[float, float]:
    """Map a paper-convention time range (t = 1 noise) to the library's (t = 1 data)."""
    a, b = paper_range
    return (1.0 - b, 1.0 - a)


@dataclass(frozen=True)
class TRangeAnneal:
    """Linear annealing of the DM time range with the step (paper Table 2, after ProlificDreamer).

    ``TRangeAnneal(start=(0, 1), end=(0.5, 1), steps=N)`` is the paper's "[0,1] annealed to
    [0,0.5]" written in the library convention (t = 1 data): the noisiest half is phased out
    linearly over ``steps`` DM steps, then the range stays at ``end``.
    """

    start: tuple[float, float] = (0.0, 1.0)
    end: tuple[float, float] = (0.5, 1.0)
    steps: int = 100_000

    def __post_init__(self) -> None:
        for r in (self.start, self.end):
            if not (0.0 <= r[0] <= r[1] <= 1.0):
                raise ValueError(f"t ranges must satisfy 0 <= t0 <= t1 <= 1, got {r}")
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")

    def __call__(self, step: int) -> tuple[float, float]:
        f = min(max(step / self.steps, 0.0), 1.0)
        return (
            self.start[0] + f * (self.end[0] - self.start[0]),
            self.start[1] + f * (self.end[1] - self.start[1]),
        )


class DMBreakdown(NamedTuple):
    """What one DM-loss call computed (all detached). ``None`` where a variant of the loss (the
    research objectives of :mod:`dmvae.demo.objectives`) has no such term."""

    loss: torch.Tensor  # () value of the surrogate
    grad: torch.Tensor | None  # (B, *S) float32 update direction g (E1); dL/dz = g / numel
    grad_norm: torch.Tensor | None  # () mean over the batch of ||g_i|| (the reference's log value)
    weight_factor: torch.Tensor | None  # (B, 1, ..) mean |z - x_hat_real| per sample
    t: torch.Tensor  # (B,) float32
    x_t: torch.Tensor  # (B, *S)
    pred_real: torch.Tensor | None  # (B, *S) x_hat of the real model (after CFG)
    pred_fake: torch.Tensor | None  # (B, *S) x_hat of the fake model (after CFG)


def surrogate_loss(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(E2): ``0.5 mean((z - sg(z - g))^2)``, whose gradient w.r.t. ``z`` is ``g / numel(z)``;
    computed in float32 outside any autocast."""
    with torch.autocast(z.device.type, enabled=False):
        return 0.5 * F.mse_loss(z, (z - g).detach())


class DistributionMatchingLoss(nn.Module):
    """DM loss between a frozen real score and an online fake score (paper Eq. 7-8).

    Args:
        real: the reference: a :class:`~dmvae.priors.ReferencePrior` or any velocity model
            ``real(x_t, t, y) -> v`` (e.g. a LatentDiT trained on p_r). Kept frozen by you.
        fake: the trainable fake score (a LatentDiT, possibly DDP-wrapped), initialised from the
            real one in the paper. Trained with :meth:`fake_loss`.
        cfg_scale: classifier-free guidance applied to BOTH models inside the loss (paper B.3 uses
            5; 1 = off). The null label is each model's own (:func:`dmvae.transport.null_label`).
        t_range: (t0, t1), library convention (t = 1 data): t = t0 + (t1 - t0) u, u ~ U[0, 1].
        t_schedule: optional callable ``step -> (t0, t1)`` overriding ``t_range`` (e.g.
            :class:`TRangeAnneal`). The step is the ``step=`` argument or the internal counter
            ``self.step`` (a buffer, so ``state_dict()`` resumes it), advanced by each forward.
        normalize: divide by the per-sample mean |z - x_hat_real| (E1). ``False`` = the toy variant.

    Latents may have any per-sample shape the networks accept, or a vector shape (B, D) when a
    network takes (B, C, H, W) with C H W = D (:func:`dmvae.transport.call_model` reshapes).
    Unconditional networks (a prior without classes, a LatentDiT with ``num_classes=0``) get no
    labels; conditional ones get ``labels``, or their null label when ``labels`` is None.

    The module holds no parameters of its own: ``real`` and ``fake`` are referenced, not
    registered, so ``loss.parameters()`` is empty and ``loss.state_dict()`` holds only ``step``.
    """

    step: torch.Tensor

    def __init__(
        self,
        real: nn.Module | Callable,
        fake: nn.Module | Callable,
        *,
        cfg_scale: float = 1.0,
        t_range: tuple[float, float] = (0.0, 1.0),
        t_schedule: Callable[[int], tuple[float, float]] | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not callable(real) or not callable(fake):
            raise TypeError("real and fake must be velocity models callable as model(x_t, t, labels)")
        if not math.isfinite(cfg_scale) or cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be a finite number >= 1 (1 = no guidance), got {cfg_scale}")
        t0, t1 = (float(x) for x in t_range)
        if not (0.0 <= t0 <= t1 <= 1.0):
            raise ValueError(f"t_range must satisfy 0 <= t0 <= t1 <= 1 (t = 1 is data), got {t_range}")
        # referenced, not registered: the loss must not own (or move, or save) the score networks
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_fake", fake)
        self.cfg_scale = float(cfg_scale)
        self.t_range = (t0, t1)
        self.t_schedule = t_schedule
        self.normalize = bool(normalize)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def real(self) -> nn.Module | Callable:
        return self._real

    @property
    def fake(self) -> nn.Module | Callable:
        """The fake network as given (possibly DDP-wrapped: :meth:`fake_loss` trains through it)."""
        return self._fake

    def networks(self) -> tuple[nn.Module | Callable, nn.Module | Callable]:
        """(real, fake) as evaluated by the DM term: wrappers stripped (no DDP hooks, no sync)."""
        return self._real, unwrap_model(self._fake)

    def extra_repr(self) -> str:
        return (
            f"cfg_scale={self.cfg_scale}, t_range={self.t_range},"
            f" t_schedule={self.t_schedule!r}, normalize={self.normalize}"
        )

    # ------------------------------------------------------------------ shared pieces
    def current_t_range(self, step: int | None = None) -> tuple[float, float]:
        if self.t_schedule is None:
            return self.t_range
        t0, t1 = self.t_schedule(int(self.step) if step is None else int(step))
        if not (0.0 <= t0 <= t1 <= 1.0):
            raise ValueError(f"t_schedule returned {(t0, t1)}; need 0 <= t0 <= t1 <= 1")
        return (float(t0), float(t1))

    def velocity(self, model: nn.Module | Callable, x_t: torch.Tensor, t: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        """``model``'s velocity at (x_t, t) as float32, guided by ``cfg_scale`` (one batched call
        of conditional and null rows), with the model's own labels convention."""
        y = resolve_labels(model, labels, x_t.shape[0], x_t.device)
        return guided_velocity(model, x_t, t, y, self.cfg_scale)

    def draw(self, z: torch.Tensor, t: torch.Tensor | float | None, noise: torch.Tensor | None,
             generator: torch.Generator | None, step: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B,), noise (B, *S)) float32: the given ones, checked, or fresh draws in the
        reference's order (noise first, then t ~ U[t0, t1])."""
        b = z.shape[0]
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
        elif noise.shape != z.shape:
            raise ValueError(f"noise must have the latents' shape {tuple(z.shape)}, got {tuple(noise.shape)}")
        if t is None:
            t0, t1 = self.current_t_range(step)
            u = torch.rand(b, generator=generator, device=z.device, dtype=torch.float32)
            t = u * (t1 - t0) + t0
        else:
            t = batch_time(t, b, z.device)
        return t.float(), noise.float()

    @staticmethod
    def _check_latents(latents: torch.Tensor, labels: torch.Tensor | None) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim < 2 or not latents.is_floating_point():
            raise ValueError(
                "latents must be a floating tensor of shape (B, ...), got "
                f"{getattr(latents, 'dtype', type(latents).__name__)} {tuple(getattr(latents, 'shape', ()))}"
            )
        if labels is not None and (labels.shape != (latents.shape[0],) or labels.is_floating_point()):
            raise ValueError(
                f"labels must be an integer tensor of shape ({latents.shape[0]},), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )

    # ------------------------------------------------------------------ Eq. 8: the DM update
    def forward(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        t: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DMBreakdown]:
        """The surrogate loss whose gradient w.r.t. ``latents`` is the DM update (E2).

        Args:
            latents: (B, *S) normalised latents z (require grad to train the encoder).
            labels: (B,) int labels, or None (the null label is used for conditional models).
            t, noise: inject the time (B,) in [0, 1] / noise (B, *S) instead of drawing them.
            step: step for ``t_schedule`` (default: the internal counter, advanced here).
            generator: torch.Generator for the noise and t draws.
        Returns: (loss, DMBreakdown). Backprop ``weight * loss`` into the encoder.
        """
        self._check_latents(latents, labels)
        t, noise = self.draw(latents, t, noise, generator, step)
        if step is None:
            self.step += 1
        return self._dm(latents, labels, t, noise)

    def _dm(self, latents: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor,
            noise: torch.Tensor) -> tuple[torch.Tensor, DMBreakdown]:
        z = latents.float()
        zd = z.detach()
        x_t = interpolate(zd, noise, t)  # (B, *S)
        real, fake = self.networks()
        with torch.no_grad(), eval_mode(real, fake):
            v_r = self.velocity(real, x_t, t, labels)
            v_f = self.velocity(fake, x_t, t, labels)
        with torch.no_grad(), torch.autocast(zd.device.type, enabled=False):
            pred_r = data_from_velocity(x_t, v_r, t)
            pred_f = data_from_velocity(x_t, v_f, t)
            p_real, p_fake = zd - pred_r, zd - pred_f
            g, w = p_real - p_fake, None
            if self.normalize:
                w = p_real.abs().mean(dim=tuple(range(1, zd.ndim)), keepdim=True)  # (B, 1, ..)
                g = g / w
            g = torch.nan_to_num(g)  # (E1)
        loss = surrogate_loss(z, g)  # (E2)
        bd = DMBreakdown(loss.detach(), g, g.flatten(1).norm(dim=1).mean(), w, t, x_t, pred_r, pred_f)
        return loss, bd

    def gradient(self, latents: torch.Tensor, labels: torch.Tensor | None = None, *,
                 t: torch.Tensor | float | None = None, noise: torch.Tensor | None = None, step: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The update direction g itself (E1): ``latents - lr * g`` is one descent step.

        Equals ``numel * dL/dz``. Does not advance the step counter.
        """
        self._check_latents(latents, labels)
        st = int(self.step) if step is None else step
        z = latents.detach().float()
        t_, noise_ = self.draw(z, t, noise, generator, st)
        return self._dm(z, labels, t_, noise_)[1].grad

    # ------------------------------------------------------------------ Eq. 7: the fake score
    def fake_loss(self, latents: torch.Tensor, labels: torch.Tensor | None = None, *,
                  t: torch.Tensor | float | None = None, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-matching loss training ``fake`` on detached latents (paper Eq. 7).

        :class:`~dmvae.transport.FlowMatching` on ``sg(z)``: ``x_t = t sg(z) + (1 - t) eps`` with
        t ~ U[0, 1] (the full range, no shift, as the reference), target ``sg(z) - eps``,
        per-sample mean over the non-batch dims. The fake model is called through its wrapper (so
        DDP synchronises its gradients) in whatever mode it is in: in train mode LatentDiT drops
        labels (its unconditional branch learns, needed by CFG); in eval mode the loss is
        deterministic. This method never changes the mode.

        Returns: (mean loss, per-sample loss (B,)).
        """
        self._check_latents(latents, labels)
        z = latents.detach().float()
        y = resolve_labels(self.fake, labels, z.shape[0], z.device)

        def fake(x: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor | None) -> torch.Tensor:
            return guided_velocity(self.fake, x, tt, yy)  # cfg 1: one plain forward, float32

        out = FlowMatching().loss(fake, z, y, t=t, noise=None if noise is None else noise.float(),
                                  generator=generator)
        return out.loss, out.per_sample
