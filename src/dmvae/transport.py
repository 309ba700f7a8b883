"""Flow-matching transport on the linear path, in the reference's time convention.

**Convention (used everywhere in dmvae):** t = 1 is data, t = 0 is noise,

    x_t = t * x1 + (1 - t) * x0,        x1 ~ data (normalised latents),  x0 ~ N(0, I),

and the network predicts the velocity ``v = dx_t/dt = x1 - x0``. The DMVAE paper writes the
reversed convention (t = 0 clean, t = 1 noise; its flow-matching loss, Eq. 3, regresses
``ε - z_0``, the negative of our target); convert with ``t_paper = 1 - t``, ``v_paper = -v``.

Derived quantities (for a model velocity v at (x_t, t)):

* clean-data estimate   x̂1 = x_t + (1 - t) v                  (regular everywhere)
* noise estimate        x̂0 = x_t - t v                        (regular everywhere)
* score                 ∇log p_t(x_t) = (t v - x_t) / (1 - t)  (singular at t = 1)
* velocity from score   v = ((1 - t) s + x_t) / t             (singular at t = 0)
* velocity from x̂1      v = (x̂1 - x_t) / (1 - t)              (singular at t = 1)

The singular conversions clamp the divisor from below by ``eps`` (default 1e-5) instead of
producing inf/nan; results within ``eps`` of the singular time are therefore approximations.

Time shift (reference ``time_dist_shift``): ``t' = 1 - s(1 - t) / (1 + (s - 1)(1 - t))``. With
``s > 1`` the times move toward 0, i.e. more of a uniform grid is spent near the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from dmvae._config import ConfigMixin

__all__ = [
    "FlowMatching",
    "FlowMatchingConfig",
    "FlowMatchingLoss",
    "apply_guidance",
    "interpolate",
    "noise_from_velocity",
    "sample_time",
    "score_from_velocity",
    "shift_time",
    "velocity_from_data",
    "velocity_from_score",
    "data_from_velocity",
]

DEFAULT_EPS = 1e-5


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar -> broadcastable against ``like`` (B, ...)."""
    t = torch.as_tensor(t, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


# ------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``1 - s(1 - t) / (1 + (s - 1)(1 - t))`` (reference ``time_dist_shift``), elementwise.

    Written exactly as the reference evaluates it, so a float32 grid reproduces its values bit for
    bit (even at s = 1 the ``1 - (1 - t)`` round trip can move a value by one ulp).
    """
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"time shift must be a finite number > 0, got {shift!r}")
    return 1 - shift * (1 - t) / (1 + (shift - 1) * (1 - t))


def sample_time(
    batch: int,
    *,
    method: Literal["uniform", "logit_normal"] = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times (B,) float32 in [0, 1]: ``uniform`` U[0, 1) or ``logit_normal``
    ``sigmoid(N(mean, std))``, then :func:`shift_time` (skipped when ``shift == 1``).

    Always float32 (the reference draws t in bf16 under autocast, which quantises t to ~3 digits).
    """
    gen_device = generator.device if generator is not None else device
    if method == "uniform":
        t = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float32)
    elif method == "logit_normal":
        z = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float32)
        t = torch.sigmoid(mean + std * z)
    else:
        raise ValueError(f"time sampling method must be 'uniform' or 'logit_normal', got {method!r}")
    if shift != 1.0:
        t = shift_time(t, shift)
    return t.to(device) if device is not None else t


# ------------------------------------------------------------------------------------------------
# path and conversions
# ------------------------------------------------------------------------------------------------


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = t x1 + (1 - t) x0`` with t (B,) broadcast over the other dims."""
    te = _expand(t, x1).to(x1.dtype)
    return te * x1 + (1 - te) * x0


def data_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-data estimate ``x̂1 = x_t + (1 - t) v``."""
    return x_t + v * (1 - _expand(t, x_t))


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise estimate ``x̂0 = x_t - t v``."""
    return x_t - _expand(t, x_t) * v


def score_from_velocity(
    x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Score ``(t v - x_t) / (1 - t)``; the divisor is clamped to >= ``eps`` (singular at t = 1)."""
    te = _expand(t, x_t)
    return (te * v - x_t) / (1 - te).clamp_min(eps)


def velocity_from_score(
    x_t: torch.Tensor, score: torch.Tensor, t: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Velocity ``((1 - t) s + x_t) / t``; the divisor is clamped to >= ``eps`` (singular at t = 0)."""
    te = _expand(t, x_t)
    return ((1 - te) * score + x_t) / te.clamp_min(eps)


def velocity_from_data(
    x_t: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Velocity ``(x̂1 - x_t) / (1 - t)``; the divisor is clamped to >= ``eps`` (singular at t = 1)."""
    te = _expand(t, x_t)
    return (x1 - x_t) / (1 - te).clamp_min(eps)


# ------------------------------------------------------------------------------------------------
# classifier-free guidance
# ------------------------------------------------------------------------------------------------


def apply_guidance(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    t: torch.Tensor | None = None,
    *,
    cfg_interval: tuple[float, float] | None = None,
    guidance_channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance ``u + s (c - u)`` on (B, C, ...) outputs.

    Returns ``(first, second)``: the guided value for the conditional and the unconditional rows.
    Both hold the same guided channels; channels beyond ``guidance_channels`` (when it is an int,
    e.g. the reference's legacy 3) are passed through unguided, conditional in ``first`` and
    unconditional in ``second``. With ``cfg_interval=(lo, hi)``, rows whose ``t`` is outside
    ``[lo, hi]`` get the conditional output instead of the guided one (``t < lo`` is unguided, so
    ``t == lo`` is guided, as in the reference's strict ``t < cfg_interval_start``).
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must match, got {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    k = cond.shape[1] if guidance_channels is None else guidance_channels
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cond.shape[1]:
        raise ValueError(
            f"guidance_channels must be None or an int in [1, {cond.shape[1]}], got {guidance_channels!r}"
        )
    c, u = cond[:, :k], uncond[:, :k]
    guided = u + scale * (c - u)
    if cfg_interval is not None:
        lo, hi = _check_interval(cfg_interval)
        if t is None:
            raise ValueError("cfg_interval needs the times t of the rows")
        te = _expand(t, c)
        guided = torch.where((te >= lo) & (te <= hi), guided, c)
    if k == cond.shape[1]:
        return guided, guided
    return torch.cat([guided, cond[:, k:]], dim=1), torch.cat([guided, uncond[:, k:]], dim=1)


def _check_interval(cfg_interval: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in cfg_interval)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval must be a (lo, hi) pair of times, got {cfg_interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {cfg_interval!r}")
    return lo, hi


# ------------------------------------------------------------------------------------------------
# training objective
# ------------------------------------------------------------------------------------------------


class FlowMatchingLoss(NamedTuple):
    """``loss``: batch mean (scalar); ``per_sample``: mean over C, H, W of the squared error (B,)."""

    loss: torch.Tensor
    per_sample: torch.Tensor


@dataclass
class FlowMatchingConfig(ConfigMixin):
    time_sampling: str = "uniform"  # "uniform" (the reference) or "logit_normal"
    logit_mean: float = 0.0  # logit-normal location (ignored for uniform)
    logit_std: float = 1.0  # logit-normal scale (ignored for uniform)
    time_shift: float = 1.0  # shift_time applied to sampled t; 1 = none (the reference trains at 1)

    def __post_init__(self) -> None:
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(
                f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}"
            )
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        shift_time(torch.zeros(()), self.time_shift)  # validates the shift


class FlowMatching:
    """Linear-path flow matching with velocity prediction (reference ``Transport`` with
    ``path='Linear', prediction='velocity'``).

    ``loss(model, x1, labels)`` draws ``x0 ~ N(0, I)`` first and then ``t`` (the reference's order),
    forms ``x_t = t x1 + (1 - t) x0`` and returns the MSE between ``model(x_t, t, labels)`` and
    ``x1 - x0``. Pass ``t`` and/or ``noise`` to make it deterministic.

    This is the paper's flow-matching loss (Eq. 3; Eq. 7 when it trains the fake score on detached
    encoder latents) in the reference's time convention.
    """

    def __init__(self, config: FlowMatchingConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError("pass either a FlowMatchingConfig or keyword fields, not both")
        self.config = config if config is not None else FlowMatchingConfig(**kwargs)

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        c = self.config
        return sample_time(batch, method=c.time_sampling, mean=c.logit_mean,  # type: ignore[arg-type]
                           std=c.logit_std, shift=c.time_shift, generator=generator, device=device)

    def loss(
        self,
        model: Callable[..., torch.Tensor],
        x1: torch.Tensor,
        labels: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> FlowMatchingLoss:
        """Flow-matching loss; ``model_kwargs`` are forwarded (e.g. ``force_drop_ids``)."""
        if x1.ndim < 2:
            raise ValueError(f"x1 must be batched (B, ...), got shape {tuple(x1.shape)}")
        b = x1.shape[0]
        if noise is None:
            gen_device = generator.device if generator is not None else x1.device
            noise = torch.randn(x1.shape, generator=generator, device=gen_device,
                                dtype=x1.dtype).to(x1.device)
        elif noise.shape != x1.shape:
            raise ValueError(f"noise must have the shape of x1 {tuple(x1.shape)}, got {tuple(noise.shape)}")
        if t is None:
            t = self.sample_time(b, generator=generator, device=x1.device)
        else:
            t = torch.as_tensor(t, device=x1.device)
            if t.ndim == 0:
                t = t.expand(b)
            if t.shape != (b,):
                raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
            if (t < 0).any() or (t > 1).any():
                raise ValueError("t must lie in [0, 1] (t = 0 noise, t = 1 data)")
        x_t = interpolate(x1, noise, t)  # (B, ...)
        target = x1 - noise  # velocity x1 - x0
        pred = model(x_t, t, labels, **model_kwargs)
        if pred.shape != target.shape:
            raise ValueError(f"model output {tuple(pred.shape)} does not match x1 {tuple(target.shape)}")
        per_sample = ((pred - target) ** 2).mean(dim=list(range(1, pred.ndim)))  # (B,)
        return FlowMatchingLoss(per_sample.mean(), per_sample)

    __call__ = loss
