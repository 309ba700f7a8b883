"""The objectives the paper's 2-D study compares (Sec. 3.2, Fig. 3), for research.

Only ``dm`` (paper Eq. 8) is the DMVAE method; it lives in :mod:`dmvae.dm_loss`. The others are the
alternatives the paper tries and rejects, written with the same pieces (the path, x̂ and the
guided velocity of :mod:`dmvae.transport`, the surrogate (E2) of :mod:`dmvae.dm_loss`), and are
selected with ``ResearchObjectiveLoss(real, fake, objective=name)``, a
:class:`~dmvae.dm_loss.DistributionMatchingLoss` that computes ``name`` instead of Eq. 8
(``objective="dm"`` is the method itself).

Notation: descent moves z by −g, where g = numel · ∂L/∂z; ``sg`` is stop-gradient; u = z − ε is
the flow-matching target; x_t = t z + (1 − t) ε. Objectives that backpropagate through a network
(``*_fm*``, ``score_diff*``, ``loss_diff``) use its Jacobian with respect to its *input* only: the
networks' parameters never receive a gradient from these losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dmvae._utils import eval_mode
from dmvae.dm_loss import DistributionMatchingLoss, DMBreakdown, surrogate_loss
from dmvae.transport import (
    MIN_ONE_MINUS_T,
    data_from_velocity,
    interpolate,
    resolve_labels,
    sample_shape,
    score_from_velocity,
)

__all__ = [
    "COMPARE_OBJECTIVES",
    "FINDINGS",
    "OBJECTIVES",
    "ResearchObjectiveLoss",
    "research_objective",
    "resolve_objective",
]

# objective name -> (reference toy ``dmd_loss_type``, one-line formula)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "dm": ("dmd", "g = (x_hat_fake - x_hat_real) [/ mean|z - x_hat_real|]; L = 0.5 mse(z, sg(z - g))"),
    "real_score": ("score_teacher", "g = -score_real; L = 0.5 mse(z, sg(z + score_real))  (ascend log p_real)"),
    "fake_score": ("score_student", "g = -score_fake; L = 0.5 mse(z, sg(z + score_fake))  (ascend log p_fake)"),
    "fake_score_repel": ("score_student_minus", "g = +score_fake; L = 0.5 mse(z, sg(z - score_fake))"),
    "real_fm_input": ("loss_teacher1", "L = 0.5 mse(real(x_t), sg(z - eps))  (grad through x_t)"),
    "real_fm_target": ("loss_teacher2", "L = 0.5 mse(z - eps, sg(real(sg x_t)))  (grad through the target)"),
    "real_fm": ("loss_teacher3", "L = 0.5 mean((real(x_t) - (z - eps))^2)  (grad through both)"),
    "fake_fm_input": ("loss_student1", "L = 0.5 mse(fake(x_t), sg(z - eps))"),
    "fake_fm_target": ("loss_student2", "L = 0.5 mse(z - eps, sg(fake(sg x_t)))"),
    "fake_fm": ("loss_student3", "L = 0.5 mean((fake(x_t) - (z - eps))^2)"),
    "score_diff_fake": ("score_teacher_student1", "L = mean((sg real(sg x_t) - fake(x_t))^2)"),
    "score_diff_real": ("score_teacher_student2", "L = mean((real(x_t) - sg fake(sg x_t))^2)"),
    "score_diff": ("score_teacher_student3", "L = mean((real(x_t) - fake(x_t))^2)"),
    "loss_diff": ("loss_teacher_student1", "L = 0.5 mse(real(x_t), z - eps) - 0.5 mse(fake(x_t), z - eps)"),
}
_ALIASES = {ref: ours for ours, (ref, _) in OBJECTIVES.items()}

# The paper's finding for each objective (Fig. 3), printed next to the measured figures.
FINDINGS: dict[str, str] = {
    "dm": "aligns: +s_real pulls to modes, -s_fake spreads",
    "real_score": "mode dropping: points pile onto high-density ridges",
    "fake_score": "collapse: nothing ties points to the reference",
    "fake_score_repel": "spreads without a target",
    "real_fm": "mode dropping (real-score maximisation)",
    "real_fm_target": "mode dropping (real-score maximisation)",
    "real_fm_input": "mode dropping (real-score maximisation)",
    "fake_fm": "collapse (fake-score maximisation)",
    "fake_fm_target": "collapse (fake-score maximisation)",
    "fake_fm_input": "collapse (fake-score maximisation)",
    "score_diff": "unstable / fails to align",
    "score_diff_real": "unstable / fails to align",
    "score_diff_fake": "unstable / fails to align",
    "loss_diff": "aligns, but needs the score-net Jacobian",
}

# objectives of ``dmvae demo --compare``: the paper's panels (b) DM, real-score maximisation
# (Flow-Prior-like), fake-score maximisation (REPA-E-like), score-difference minimisation, and
# (c) the loss difference.
COMPARE_OBJECTIVES = ("dm", "real_score", "fake_score", "score_diff", "loss_diff")


def resolve_objective(name: str) -> str:
    """The library name of an objective (reference toy names are aliases); unknown names raise."""
    if not isinstance(name, str):
        raise TypeError(f"objective must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name, name)
    if key not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return key


def _input_jacobian_only(model: Callable, x: torch.Tensor, t: torch.Tensor,
                         y: torch.Tensor | None) -> torch.Tensor:
    """``model(x, t, y)`` as float32, differentiable in ``x`` but not in the model's parameters
    (they are passed detached), with vector latents reshaped to the model's input shape."""
    shape = sample_shape(model)
    xin = x
    if shape is not None and tuple(x.shape[1:]) != shape and x[0].numel() == torch.Size(shape).numel():
        xin = x.reshape(x.shape[0], *shape)
    if isinstance(model, nn.Module):
        params = {k: p.detach() for k, p in model.named_parameters()}
        out = functional_call(model, params, (xin, t, y))
    else:
        out = model(xin, t, y)
    return out.reshape(x.shape).float()


class ResearchObjectiveLoss(DistributionMatchingLoss):
    """:class:`~dmvae.dm_loss.DistributionMatchingLoss` computing one of :data:`OBJECTIVES`.

    ``objective="dm"`` (or the reference name ``"dmd"``) is the method itself (Eq. 8); the others
    are the alternatives of the paper's Fig. 3. Every other argument is the parent's. The time and
    noise draws, the step counter, CFG and the fake-score loss (Eq. 7) are the parent's, so two
    objectives differ only in the update they compute.
    """

    def __init__(self, real: nn.Module | Callable, fake: nn.Module | Callable, *, objective: str = "dm",
                 **kwargs: Any) -> None:
        super().__init__(real, fake, **kwargs)
        self.objective = resolve_objective(objective)

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}, {super().extra_repr()}"

    def _dm(self, latents: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor,
            noise: torch.Tensor) -> tuple[torch.Tensor, DMBreakdown]:
        if self.objective == "dm":
            return super()._dm(latents, labels, t, noise)
        return research_objective(self, latents, labels, t, noise)

    def gradient(self, latents: torch.Tensor, labels: torch.Tensor | None = None, *,
                 t: torch.Tensor | float | None = None, noise: torch.Tensor | None = None,
                 step: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``numel * dL/dz`` of the objective (for ``"dm"``, the parent's g itself)."""
        if self.objective == "dm":
            return super().gradient(latents, labels, t=t, noise=noise, step=step, generator=generator)
        self._check_latents(latents, labels)
        z = latents.detach().float().requires_grad_(True)
        st = int(self.step) if step is None else step
        loss, _ = self.forward(z, labels, t=t, noise=noise, step=st, generator=generator)
        (gz,) = torch.autograd.grad(loss, z)
        return gz * z.numel()


def research_objective(
    loss_fn: ResearchObjectiveLoss,
    latents: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    noise: torch.Tensor,
):
    """Loss and breakdown of ``loss_fn.objective`` (not ``"dm"``) for drawn ``t`` and ``noise``."""
    name = loss_fn.objective
    real, fake = loss_fn.networks()
    z = latents.float()
    b = z.shape[0]

    if name in ("real_score", "fake_score", "fake_score_repel"):  # g is explicit: no autograd
        zd = z.detach()
        x_t = interpolate(zd, noise, t)
        net = real if name == "real_score" else fake
        with torch.no_grad(), eval_mode(real, fake):
            v = loss_fn.velocity(net, x_t, t, labels)
        with torch.no_grad(), torch.autocast(zd.device.type, enabled=False):
            score = score_from_velocity(x_t, v, t, eps=MIN_ONE_MINUS_T)
            g = torch.nan_to_num(score if name == "fake_score_repel" else -score)
            pred = data_from_velocity(x_t, v, t)
        loss = surrogate_loss(z, g)
        pred_r, pred_f = (pred, None) if net is real else (None, pred)
        return loss, DMBreakdown(loss.detach(), g, g.flatten(1).norm(dim=1).mean(), None, t, x_t, pred_r, pred_f)

    x_t = interpolate(z, noise, t)  # depends on z
    u = z - noise  # flow-matching target, depends on z

    def call(model: Callable, x: torch.Tensor) -> torch.Tensor:
        return _input_jacobian_only(model, x, t, resolve_labels(model, labels, b, z.device))

    with eval_mode(real, fake):
        if name in ("real_fm_input", "fake_fm_input"):
            net = real if name.startswith("real") else fake
            loss = 0.5 * F.mse_loss(call(net, x_t), u.detach())
        elif name in ("real_fm_target", "fake_fm_target"):
            net = real if name.startswith("real") else fake
            with torch.no_grad():
                v = call(net, x_t.detach())
            loss = 0.5 * F.mse_loss(u, v)
        elif name in ("real_fm", "fake_fm"):
            net = real if name.startswith("real") else fake
            loss = 0.5 * (call(net, x_t) - u).square().mean()
        elif name == "score_diff_fake":
            with torch.no_grad():
                v_r = call(real, x_t.detach())
            loss = (v_r - call(fake, x_t)).square().mean()
        elif name == "score_diff_real":
            with torch.no_grad():
                v_f = call(fake, x_t.detach())
            loss = (call(real, x_t) - v_f).square().mean()
        elif name == "score_diff":
            loss = (call(real, x_t) - call(fake, x_t)).square().mean()
        elif name == "loss_diff":
            loss = 0.5 * F.mse_loss(call(real, x_t), u) - 0.5 * F.mse_loss(call(fake, x_t), u)
        else:  # pragma: no cover - resolve_objective guards the name
            raise AssertionError(name)
    loss = loss.float()
    return loss, DMBreakdown(loss.detach(), None, None, None, t, x_t.detach(), None, None)
