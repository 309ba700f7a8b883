"""dmvae.checks: the one home of "is this argument a usable number / tensor"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmvae.checks import check_finite, check_float_tensor, check_int, check_range


def test_check_finite_accepts_numbers_and_scalar_tensors() -> None:
    assert check_finite("x", 2) == 2.0 and isinstance(check_finite("x", 2), float)
    assert check_finite("x", np.float32(0.5)) == 0.5 and check_finite("x", torch.tensor(1.5)) == 1.5
    for bad, kind, match in [(float("nan"), ValueError, "x must be a finite number, got nan"),
                             (-math.inf, ValueError, "finite"), (True, TypeError, "got bool True"),
                             ("1", TypeError, "got str '1'"), (torch.ones(2), TypeError, r"shape \(2,\)")]:  # fmt: skip
        with pytest.raises(kind, match=match):
            check_finite("x", bad)


def test_check_range_open_and_closed_ends() -> None:
    assert check_range("p", 1.0, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1"):
        check_range("p", 1.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"w must be in \(0, inf\], got 0"):
        check_range("w", 0, 0.0, low_open=True)
    with pytest.raises(ValueError, match="finite"):
        check_range("w", float("inf"), 0.0)


def test_check_int_refuses_floats_and_bools() -> None:
    assert check_int("n", np.int64(3), 1) == 3
    with pytest.raises(ValueError, match=r"n must be in \[1, inf\], got 0"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\], got 2"):
        check_int("rank", 2, 0, 1)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad)


def test_check_float_tensor_dtype_and_range() -> None:
    x = torch.linspace(-1, 1, 5)
    assert check_float_tensor("images", x, value_range=(-1, 1)) is x
    with pytest.raises(TypeError, match="floating-point tensor, got torch.uint8; x / 127.5 - 1"):
        check_float_tensor("images", torch.zeros(2, dtype=torch.uint8), hint="x / 127.5 - 1")
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\], got values in \[-1, 255\]"):
        check_float_tensor("images", torch.tensor([-1.0, 255.0]), value_range=(-1, 1))
    with pytest.raises(ValueError, match="1 NaN"):
        check_float_tensor("images", torch.tensor([0.0, float("nan")]), value_range=(-1, 1))
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        check_float_tensor("images", [0.0])
