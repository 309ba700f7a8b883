"""The distribution-matching (DM) loss: pull the aggregate latent distribution q(z) towards p_r(z).

Paper Sec. 3.1 (Eq. 7-9) and the reference ``train_dmd.py``. Two velocity networks share one
noisy latent: the frozen *real* score (the reference prior: a :class:`~dmvae.priors.ReferencePrior`
or a LatentDiT fitted on p_r) and the online *fake* score that tracks q(z). The encoder is pushed
along the difference of their clean-sample predictions; no gradient goes through either network.

Time convention (the library's and the reference code's; the paper's is reversed, s = 1 - t)::

    x_t = t z + (1 - t) eps          t = 1: data, t = 0: noise
    x_hat = x_t + (1 - t) v(x_t, t)  predicted clean latent of a velocity model

The update direction, exactly as the reference computes it (paper Eq. 8 with DMD's weighting)::

    v_r, v_f  = real(x_t, t, y), fake(x_t, t, y)             (no grad)
    CFG on both (each with its own null label): v += (s - 1) (v - v(x_t, t, null))
    p_real, p_fake = z - x_hat_r, z - x_hat_f
    g = nan_to_num((p_real - p_fake) / mean_{C,H,W} |p_real|)  (per-sample DMD normaliser)   (E1)
    L_DM = 0.5 mean((z - sg(z - g))^2)  =>  dL_DM/dz = g / numel(z)                          (E2)

Since s_fake - s_real is proportional to x_hat_fake - x_hat_real (score = (t v - x_t)/(1 - t)),
descending L_DM moves z towards the real prediction and away from the fake one, i.e. it lowers
KL(q || p_r). ``normalize=False`` drops the divisor of (E1) (the reference's 2-D toy).

A paper-convention range [a, b] (t = 1 noise) is the library range [1 - b, 1 - a]; the paper's
annealing "[0, 1] -> [0, 0.5]" (Table 2) is therefore ``TRangeAnneal(start=(0, 1), end=(0.5, 1))``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DistributionMatchingLoss",
    "DMBreakdown",
    "TRangeAnneal",
    "paper_to_library_t_range",
    "OBJECTIVES",
    "unwrap_model",
]

# objective name -> (reference toy ``dmd_loss_type``, one-line formula). See docs/priors.md.
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
_EXPLICIT = {"dm", "real_score", "fake_score", "fake_score_repel"}  # g known without autograd
_MIN_ONE_MINUS_T = 1e-4


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
    """What one DM-loss call computed (all detached). ``None`` where an objective has no such term."""

    loss: torch.Tensor  # () value of the surrogate
    grad: torch.Tensor | None  # (B, *S) float32 update direction g (E1); dL/dz = g / numel
    grad_norm: torch.Tensor | None  # () mean over the batch of ||g_i|| (the reference's log value)
    weight_factor: torch.Tensor | None  # (B, 1, ..) mean |z - x_hat_real| per sample
    t: torch.Tensor  # (B,) float32
    x_t: torch.Tensor  # (B, *S)
    pred_real: torch.Tensor | None  # (B, *S) x_hat of the real model (after CFG)
    pred_fake: torch.Tensor | None  # (B, *S) x_hat of the fake model (after CFG)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _num_classes(model: Callable) -> int | None:
    """The null (unconditional) label of a velocity model, or None for an unconditional one.

    LatentDiT: ``config.num_classes`` (its ``null_class``; -1 marks a model built without a null
    row, i.e. ``class_dropout_prob=0``). Priors: ``num_classes`` (label == num_classes = mixture).
    """
    m = unwrap_model(model) if isinstance(model, nn.Module) else model
    cfg = getattr(m, "config", None)
    if cfg is not None and hasattr(cfg, "num_classes"):
        if hasattr(m, "null_class") and m.null_class is None:
            return -1
        return cfg.num_classes
    return getattr(m, "num_classes", None)


@contextlib.contextmanager
def _eval_mode(*modules: object) -> Iterator[None]:
    """Temporarily put modules in eval mode; restore every submodule's own flag afterwards."""
    saved = [(m, m.training) for mod in modules if isinstance(mod, nn.Module) for m in mod.modules()]
    try:
        for mod in modules:
            if isinstance(mod, nn.Module):
                mod.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


class DistributionMatchingLoss(nn.Module):
    """DM loss between a frozen real score and an online fake score (paper Eq. 7-8).

    Args:
        real: the reference: a :class:`~dmvae.priors.ReferencePrior` or any velocity model
            ``real(x_t, t, y) -> v`` (e.g. a LatentDiT trained on p_r). Kept frozen by you.
        fake: the trainable fake score (a LatentDiT, possibly DDP-wrapped), initialised from the
            real one in the paper. Trained with :meth:`fake_loss`.
        cfg_scale: classifier-free guidance applied to BOTH models inside the loss (paper B.3 uses
            5; 1 = off). The null label is ``num_classes`` of each model.
        t_range: (t0, t1), library convention (t = 1 data): t = t0 + (t1 - t0) u, u ~ U[0, 1].
        t_schedule: optional callable ``step -> (t0, t1)`` overriding ``t_range`` (e.g.
            :class:`TRangeAnneal`). The step is the ``step=`` argument or the internal counter
            ``self.step`` (a buffer, so ``state_dict()`` resumes it), advanced by each forward.
        normalize: divide by the per-sample mean |z - x_hat_real| (E1). ``False`` = the toy variant.
        objective: ``"dm"`` (default) or one of the research variants of the paper's 2-D study,
            see :data:`OBJECTIVES` (reference toy names are accepted as aliases).

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
        objective: str = "dm",
    ) -> None:
        super().__init__()
        if not callable(real) or not callable(fake):
            raise TypeError("real and fake must be velocity models callable as model(x_t, t, labels)")
        if cfg_scale < 1.0 or not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number >= 1 (1 = no guidance), got {cfg_scale}")
        t0, t1 = (float(x) for x in t_range)
        if not (0.0 <= t0 <= t1 <= 1.0):
            raise ValueError(f"t_range must satisfy 0 <= t0 <= t1 <= 1 (t = 1 is data), got {t_range}")
        name = _ALIASES.get(objective, objective)
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
        # referenced, not registered: the loss must not own (or move, or save) the score networks
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_fake", fake)
        self.cfg_scale = float(cfg_scale)
        self.t_range = (t0, t1)
        self.t_schedule = t_schedule
        self.normalize = bool(normalize)
        self.objective = name
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def real(self):
        return self._real

    @property
    def fake(self):
        return self._fake

    def extra_repr(self) -> str:
        return (
            f"objective={self.objective!r}, cfg_scale={self.cfg_scale}, t_range={self.t_range},"
            f" t_schedule={self.t_schedule!r}, normalize={self.normalize}"
        )

    # ------------------------------------------------------------------ helpers
    def current_t_range(self, step: int | None = None) -> tuple[float, float]:
        if self.t_schedule is None:
            return self.t_range
        t0, t1 = self.t_schedule(int(self.step) if step is None else int(step))
        if not (0.0 <= t0 <= t1 <= 1.0):
            raise ValueError(f"t_schedule returned {(t0, t1)}; need 0 <= t0 <= t1 <= 1")
        return (float(t0), float(t1))

    def _labels(self, model, labels: torch.Tensor | None, b: int, device) -> torch.Tensor | None:
        nc = _num_classes(model)
        if nc is None:
            return None  # unconditional model / prior: labels are ignored
        if labels is None:
            if nc == -1:
                m = unwrap_model(model)
                if m.config.num_classes == 1:
                    return torch.zeros((b,), dtype=torch.long, device=device)
                raise ValueError(
                    f"{type(m).__name__} has no null class (class_dropout_prob=0); pass labels"
                )
            return torch.full((b,), nc, dtype=torch.long, device=device)
        return labels

    def _velocity(self, model, x_t, t, labels) -> torch.Tensor:
        """Velocity with CFG (``v + (s-1)(v - v_null)``) as float32, one batched call."""
        b = x_t.shape[0]
        y = self._labels(model, labels, b, x_t.device)
        nc = _num_classes(model)
        if self.cfg_scale == 1.0 or y is None:
            return model(x_t, t, y).float()
        if nc == -1:
            raise ValueError(
                f"cfg_scale={self.cfg_scale} needs an unconditional branch, but "
                f"{type(unwrap_model(model)).__name__} was built without a null class"
            )
        null = torch.full_like(y, nc)
        v_both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).float()
        v_c, v_u = v_both[:b], v_both[b:]
        return v_c + (self.cfg_scale - 1.0) * (v_c - v_u)

    def _draw(self, z, t, noise, generator, step):
        b = z.shape[0]
        if noise is None:  # reference order: noise first, then t
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
        elif noise.shape != z.shape:
            raise ValueError(f"noise must have the latents' shape {tuple(z.shape)}, got {tuple(noise.shape)}")
        if t is None:
            t0, t1 = self.current_t_range(step)
            u = torch.rand(b, generator=generator, device=z.device, dtype=torch.float32)
            t = u * (t1 - t0) + t0
        else:
            t = torch.as_tensor(t, dtype=torch.float32, device=z.device)
            if t.ndim == 0:
                t = t.expand(b)
            if t.shape != (b,):
                raise ValueError(f"t must be a scalar or of shape ({b},), got {tuple(t.shape)}")
        return t.float(), noise.float()

    @staticmethod
    def _check_latents(latents: torch.Tensor, labels: torch.Tensor | None) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim < 2 or not latents.is_floating_point():
            raise ValueError(
                "latents must be a floating tensor of shape (B, ...), got "
                f"{getattr(latents, 'dtype', type(latents).__name__)} {tuple(getattr(latents, 'shape', ()))}"
            )
        if labels is not None and (labels.shape != (latents.shape[0],) or labels.is_floating_point()):
            raise ValueError(f"labels must be an integer tensor of shape ({latents.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")

    # ------------------------------------------------------------------ DM loss
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
            t, noise: inject the time (B,) / noise (B, *S) instead of drawing them.
            step: step for ``t_schedule`` (default: the internal counter, advanced here).
            generator: torch.Generator for the noise and t draws.
        Returns: (loss, DMBreakdown). Backprop ``weight * loss`` into the encoder.
        """
        self._check_latents(latents, labels)
        t, noise = self._draw(latents, t, noise, generator, step)
        if step is None:
            self.step += 1
        if self.objective in _EXPLICIT:
            out = self._explicit(latents, labels, t, noise)
        else:
            out = self._autograd_objective(latents, labels, t, noise)
        return out[0], out[1]

    def _explicit(self, latents, labels, t, noise):
        z = latents.float()
        zd = z.detach()
        tb = _bcast(t, zd)
        x_t = tb * zd + (1 - tb) * noise  # (B, *S)
        real, fake = self.real, unwrap_model(self.fake) if isinstance(self.fake, nn.Module) else self.fake
        device_type = zd.device.type
        with torch.no_grad(), _eval_mode(real, fake):
            need_real = self.objective in ("dm", "real_score")
            need_fake = self.objective != "real_score"
            v_r = self._velocity(real, x_t, t, labels) if need_real else None
            v_f = self._velocity(fake, x_t, t, labels) if need_fake else None
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            pred_r = x_t + (1 - tb) * v_r if v_r is not None else None
            pred_f = x_t + (1 - tb) * v_f if v_f is not None else None
            w = None
            if self.objective == "dm":
                p_real = zd - pred_r
                p_fake = zd - pred_f
                g = p_real - p_fake
                if self.normalize:
                    w = p_real.abs().mean(dim=tuple(range(1, zd.ndim)), keepdim=True)  # (B, 1, ..)
                    g = g / w
                g = torch.nan_to_num(g)  # (E1)
            else:
                v = v_r if self.objective == "real_score" else v_f
                score = (tb * v - x_t) / (1 - tb).clamp_min(_MIN_ONE_MINUS_T)
                g = torch.nan_to_num(score if self.objective == "fake_score_repel" else -score)
        with torch.autocast(device_type, enabled=False):
            loss = 0.5 * F.mse_loss(z, (z - g).detach())  # (E2)
        bd = DMBreakdown(
            loss=loss.detach(),
            grad=g,
            grad_norm=g.flatten(1).norm(dim=1).mean(),
            weight_factor=w,
            t=t,
            x_t=x_t,
            pred_real=pred_r,
            pred_fake=pred_f,
        )
        return loss, bd

    def _autograd_objective(self, latents, labels, t, noise):
        name = self.objective
        z = latents.float()
        tb = _bcast(t, z)
        x_t = tb * z + (1 - tb) * noise  # depends on z
        u = z - noise  # flow-matching target, depends on z
        real = self.real
        fake = unwrap_model(self.fake) if isinstance(self.fake, nn.Module) else self.fake
        device_type = z.device.type

        def call(model, x):
            y = self._labels(model, labels, z.shape[0], z.device)
            return model(x, t, y).float()

        with _eval_mode(real, fake):
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
            else:  # pragma: no cover - guarded in __init__
                raise AssertionError(name)
        with torch.autocast(device_type, enabled=False):
            loss = loss.float()
        bd = DMBreakdown(loss.detach(), None, None, None, t, x_t.detach(), None, None)
        return loss, bd

    def gradient(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        t: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The update direction g itself (E1): ``latents - lr * g`` is one descent step.

        Equals ``numel * dL/dz``. Does not advance the step counter.
        """
        self._check_latents(latents, labels)
        st = int(self.step) if step is None else step
        if self.objective in _EXPLICIT:
            t_, noise_ = self._draw(latents, t, noise, generator, st)
            return self._explicit(latents.detach(), labels, t_, noise_)[1].grad
        z = latents.detach().float().requires_grad_(True)
        loss, _ = self.forward(z, labels, t=t, noise=noise, step=st, generator=generator)
        (gz,) = torch.autograd.grad(loss, z)
        return gz * z.numel()

    # ------------------------------------------------------------------ fake score training
    def fake_loss(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        t: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-matching loss training ``fake`` on detached latents (paper Eq. 7).

        ``x_t = t sg(z) + (1 - t) eps`` with t ~ U[0, 1] (the full range, no shift, as the
        reference), target ``sg(z) - eps``, per-sample mean over the non-batch dims. The fake
        model is called through its wrapper (so DDP synchronises its gradients) in whatever mode
        it is in: in train mode LatentDiT drops labels (its unconditional branch learns, needed by
        CFG); in eval mode the loss is deterministic. This method never changes the mode.

        Returns: (mean loss, per-sample loss (B,)).
        """
        self._check_latents(latents, labels)
        z = latents.detach().float()
        b = z.shape[0]
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, device=z.device)
        if t is None:
            t = torch.rand(b, generator=generator, device=z.device)
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device)
        if t.ndim == 0:
            t = t.expand(b)
        tb = _bcast(t, z)
        x_t = tb * z + (1 - tb) * noise.float()
        target = z - noise.float()
        y = self._labels(self.fake, labels, b, z.device)
        pred = self.fake(x_t, t, y)
        per_sample = (pred.float() - target).square().mean(dim=tuple(range(1, z.ndim)))  # (B,)
        return per_sample.mean(), per_sample
