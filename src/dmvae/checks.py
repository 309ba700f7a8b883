"""Input checks for the public numeric knobs and tensors of the library (the bottom layer).

One home for "is this argument a usable number": samplers, metrics and generation call these on
every public knob (``cfg_scale``, ``cfg_interval``, ``time_shift``, ...) and on the tensors a
metric could misread (uint8 images where [-1, 1] floats are expected), so a NaN, an infinity or a
value of the wrong kind raises a ``ValueError`` / ``TypeError`` that names the argument instead of
reaching the output silently.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["check_finite", "check_float_tensor", "check_int", "check_range"]


def check_finite(name: str, value: Any) -> float:
    """``value`` as a finite float; ``bool``, non-numbers, NaN and +-inf raise, naming ``name``.

    A 0-dim tensor is accepted (read with ``.item()``, so this synchronises a GPU value)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """:func:`check_finite`, then ``low <= value <= high`` (``low_open`` / ``high_open`` exclude the ends)."""
    v = check_finite(name, value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        shown_low = "-inf" if low is None else f"{low:g}"
        shown_high = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {lo}{shown_low}, {shown_high}{hi}, got {v:g}")
    return v


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; bools, floats and other types raise, naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be in [{'-inf' if low is None else low}, {'inf' if high is None else high}], "
                         f"got {v}")
    return v


def check_float_tensor(name: str, x: Any, *, value_range: tuple[float, float] | None = None,
                       hint: str = "") -> torch.Tensor:
    """``x`` must be a floating-point tensor (not uint8 / int / bool / complex, which a model or a
    metric expecting floats would misread); with ``value_range`` its finite values must lie in it
    (one reduction over ``x``). ``hint`` is appended to the error (how to convert)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}{'; ' + hint if hint else ''}")
    if value_range is not None and x.numel() and not x.is_meta:
        lo, hi = value_range
        finite = x[torch.isfinite(x)]
        if finite.numel() != x.numel():
            raise ValueError(f"{name} holds {x.numel() - finite.numel()} NaN or infinite value(s)")
        if finite.numel():
            mn, mx = float(finite.min()), float(finite.max())
            tol = 1e-3 * (hi - lo)
            if mn < lo - tol or mx > hi + tol:
                raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}], got values in [{mn:.4g}, {mx:.4g}]"
                                 f"{'; ' + hint if hint else ''}")
    return x
