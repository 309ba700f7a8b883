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

Calling a velocity model (one home for each convention, used by the samplers, the DM loss and the
priors): :func:`null_label` finds the label of a model's unconditional branch, :func:`resolve_labels`
fills in labels the caller left out, :func:`guided_velocity` runs conditional and unconditional
rows in ONE forward of the doubled batch and combines them with :func:`apply_guidance`, and
:func:`call_model` reshapes vector latents (B, D) to a network's (B, C, H, W) input and back.

Time shift (reference ``time_dist_shift``): ``t' = 1 - s(1 - t) / (1 + (s - 1)(1 - t))``. With
``s > 1`` the times move toward 0, i.e. more of a uniform grid is spent near the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from dmvae._config import ConfigMixin
from dmvae._utils import unwrap_model

__all__ = [
    "MIN_ONE_MINUS_T",
    "FlowMatching",
    "FlowMatchingConfig",
    "FlowMatchingLoss",
    "apply_guidance",
    "batch_time",
    "call_model",
    "check_time",
    "data_from_velocity",
    "gaussian_velocity",
    "guidance_null_label",
    "guided_velocity",
    "interpolate",
    "noise_from_velocity",
    "null_label",
    "resolve_labels",
    "sample_shape",
    "sample_time",
    "score_from_velocity",
    "shift_time",
    "velocity_from_data",
    "velocity_from_score",
]

DEFAULT_EPS = 1e-5
#: The smallest ``1 - t`` the priors (and the research objectives of the 2-D study) divide by when
#: they turn a velocity into a score or a clean-sample prediction into a velocity.
MIN_ONE_MINUS_T = 1e-4


def check_time(t: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` unless every t is a number in [0, 1] (NaN is refused); returns t.

    For times that come from the caller (training and losses); a sampler's own grid is valid
    by construction and is not checked (this check reads the values back to the host)."""
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))]
        raise ValueError(f"t must lie in [0, 1] (t = 0 noise, t = 1 data), got {bad.flatten()[:4].tolist()}")
    return t


def batch_time(t: torch.Tensor | float, batch: int, device: torch.device | str | None = None, *,
               check: bool = True) -> torch.Tensor:
    """``t`` as a (B,) floating tensor on ``device``: the one place a caller's time is normalised.

    A number or a 0-d tensor is expanded to ``batch`` rows (a view, no copy); an integer tensor
    becomes float32; any shape other than () or (B,) raises. With ``check`` the values must lie in
    [0, 1] (:func:`check_time`, which reads them back to the host)."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
    return check_time(t) if check else t


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


def score_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Score ``(t v - x_t) / (1 - t)``; the divisor is clamped to >= ``eps`` (singular at t = 1)."""
    te = _expand(t, x_t)
    return (te * v - x_t) / (1 - te).clamp_min(eps)


def gaussian_velocity(
    x_t: torch.Tensor, t: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity ``E[x - eps | x_t]`` for data ``x ~ N(mean, var)`` per coordinate, and the
    variance ``d = t^2 var + (1 - t)^2`` of ``x_t`` (``t``, ``mean``, ``var`` broadcast against
    ``x_t``)::

        v = mean + (t var - (1 - t)) (x_t - t mean) / d

    Finite for every t in [0, 1] (no division by 1 - t); ``d`` is floored at 1e-12 so a point
    mass (var = 0) at t = 1 stays finite. The one home of this posterior: the Gaussian, mixture and
    sample-bank priors all use it."""
    d = (t.square() * var + (1 - t).square()).clamp_min(1e-12)
    return mean + (t * var - (1 - t)) * (x_t - t * mean) / d, d


def velocity_from_score(
    x_t: torch.Tensor, score: torch.Tensor, t: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Velocity ``((1 - t) s + x_t) / t``; the divisor is clamped to >= ``eps`` (singular at t = 0)."""
    te = _expand(t, x_t)
    return ((1 - te) * score + x_t) / te.clamp_min(eps)


def velocity_from_data(x_t: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Velocity ``(x̂1 - x_t) / (1 - t)``; the divisor is clamped to >= ``eps`` (singular at t = 1)."""
    return (x1 - x_t) / (1 - _expand(t, x_t)).clamp_min(eps)


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


def guided_velocity(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    cfg_scale: float = 1.0,
    *,
    null: int | None = None,
    cfg_interval: tuple[float, float] | None = None,
    guidance_channels: int | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """The (guided) velocity of ``model`` at ``(x, t)``, in ``x``'s dtype.

    With ``cfg_scale == 1`` or ``labels is None`` (an unconditional model): one plain forward
    ``model(x, t, labels)``. Otherwise the conditional and unconditional rows run in ONE forward of
    the doubled batch ``([x; x], [t; t], [labels; null])`` and are combined by
    :func:`apply_guidance`, ``u + s (c - u)``. ``null`` is the unconditional label (default:
    :func:`null_label` of the model). ``t`` is a (B,) tensor or a 0-d tensor (expanded, no copy),
    never a Python float, so a compiled model sees the same input types at every step.
    """
    t = batch_time(t, x.shape[0], x.device, check=False)
    if cfg_scale == 1.0 or labels is None:
        return call_model(model, x, t, labels, **model_kwargs).to(x.dtype)
    null = guidance_null_label(model, null)
    y = torch.cat([labels, torch.full_like(labels, null)])
    out = call_model(model, torch.cat([x, x]), torch.cat([t, t]), y, **model_kwargs).to(x.dtype)  # (2B, ...): conditional rows, then unconditional rows
    cond, uncond = out.chunk(2)
    guided, _ = apply_guidance(cond, uncond, cfg_scale, t, cfg_interval=cfg_interval,
                               guidance_channels=guidance_channels)
    return guided


def _check_interval(cfg_interval: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in cfg_interval)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval must be a (lo, hi) pair of times, got {cfg_interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {cfg_interval!r}")
    return lo, hi


# ------------------------------------------------------------------------------------------------
# labels and shapes of a velocity model
# ------------------------------------------------------------------------------------------------


def null_label(model: Any) -> int | None:
    """The label of ``model``'s unconditional branch, or None when it has none.

    One rule for every velocity model (wrappers such as DDP and ``torch.compile`` are looked
    through): a :class:`~dmvae.dit.LatentDiT` has ``null_class`` (its ``num_classes``; None when
    it was built with ``class_dropout_prob=0`` or is unconditional); a class-conditional
    :class:`~dmvae.priors.ReferencePrior` uses label ``num_classes`` for its unconditional
    mixture; any other callable has none unless it defines ``null_class``.
    """
    m = unwrap_model(model)
    if hasattr(m, "null_class"):
        return m.null_class
    nc = getattr(m, "num_classes", None)
    return nc if nc else None


def guidance_null_label(model: Any, null: int | None = None) -> int:
    """The label classifier-free guidance uses for ``model``'s unconditional rows: ``null`` when
    given, else :func:`null_label`; a model without a null class raises (the one such check)."""
    if null is None:
        null = null_label(model)
    if null is None:
        raise ValueError(
            "classifier-free guidance needs the null label: "
            f"{type(unwrap_model(model)).__name__} has no null class (a LatentDiT built with "
            "class_dropout_prob=0 or num_classes=0) and no null label was given"
        )
    return null


def resolve_labels(
    model: Any, labels: torch.Tensor | None, batch: int, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """The labels to call ``model`` with when the caller's may be missing.

    * an unconditional model (``num_classes`` None or 0) gets None: one label vector can serve a
      conditional and an unconditional network side by side;
    * given labels are returned as they are;
    * missing labels become the null label (the unconditional branch), or class 0 for a
      one-class model without a null row; a many-class model without one raises.
    """
    m = unwrap_model(model)
    if hasattr(m, "num_classes") and not m.num_classes:
        return None
    if labels is not None:
        return labels
    null = null_label(model)
    if null is not None:
        return torch.full((batch,), null, dtype=torch.long, device=device)
    nc = getattr(m, "num_classes", None)
    if nc is None:
        return None  # a plain callable without labels
    if nc == 1:
        return torch.zeros((batch,), dtype=torch.long, device=device)
    raise ValueError(
        f"{type(m).__name__} has {nc} classes and no null class (class_dropout_prob=0): pass labels"
    )


def sample_shape(model: Any) -> tuple[int, ...] | None:
    """Shape of one input of ``model`` without the batch dimension, when the model declares it:
    ``(in_channels, input_size, input_size)`` of a LatentDiT, ``shape`` of a ReferencePrior."""
    m = unwrap_model(model)
    cfg = getattr(m, "config", None)
    if cfg is not None and all(hasattr(cfg, a) for a in ("in_channels", "input_size")):
        return (cfg.in_channels, cfg.input_size, cfg.input_size)
    shape = getattr(m, "shape", None)
    if isinstance(m, nn.Module) and isinstance(shape, tuple):
        return shape
    return None


def call_model(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
               **model_kwargs: Any) -> torch.Tensor:
    """``model(x, t, labels)`` with ``x`` reshaped to the model's input shape and the output back.

    Lets vector latents (B, D) meet a LatentDiT over (B, C, H, W) with C H W = D (e.g. 2-D points
    and a one-token DiT over (2, 1, 1)); any other shape is passed through unchanged, so the
    model's own shape check reports a real mismatch.
    """
    shape = sample_shape(model)
    if shape is None or tuple(x.shape[1:]) == shape or math.prod(x.shape[1:]) != math.prod(shape):
        return model(x, t, labels, **model_kwargs)
    out = model(x.reshape(x.shape[0], *shape), t, labels, **model_kwargs)
    return out.reshape(x.shape)


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
            t = batch_time(t, b, x1.device)
        x_t = interpolate(x1, noise, t)  # (B, ...)
        target = x1 - noise  # velocity x1 - x0
        pred = model(x_t, t, labels, **model_kwargs)
        if pred.shape != target.shape:
            raise ValueError(f"model output {tuple(pred.shape)} does not match x1 {tuple(target.shape)}")
        per_sample = ((pred - target) ** 2).mean(dim=list(range(1, pred.ndim)))  # (B,)
        return FlowMatchingLoss(per_sample.mean(), per_sample)

    __call__ = loss
