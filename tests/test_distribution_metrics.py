"""Energy distance, RBF-MMD, sliced Wasserstein and coverage against direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmvae.metrics.distribution import coverage, energy_distance, median_bandwidth, rbf_mmd, sliced_wasserstein


def _direct_energy(x, y):
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def test_energy_distance_blocked_equals_direct_and_unbiased():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) + 0.3
    direct = _direct_energy(x, y)
    assert abs(energy_distance(x, y, block_size=64) - direct) < 1e-10
    n, m = 300, 200
    dxx, dyy = torch.cdist(x.double(), x.double()).sum(), torch.cdist(y.double(), y.double()).sum()
    u = 2 * torch.cdist(x.double(), y.double()).mean() - dxx / (n * (n - 1)) - dyy / (m * (m - 1))
    assert abs(energy_distance(x, y, unbiased=True, block_size=50) - u.item()) < 1e-10
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_energy_distance_matches_scipy_in_1d():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, generator=g), torch.randn(300, generator=g) * 1.5 + 0.2
    # scipy returns sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) (the V-statistic) in 1-D
    assert energy_distance(a, b) == pytest.approx(scipy_stats.energy_distance(a, b) ** 2, rel=1e-8)


def test_rbf_mmd_blocked_equals_direct():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(150, 3, generator=g), torch.randn(120, 3, generator=g) * 1.2
    s = 1.3
    k = lambda a, b: torch.exp(-torch.cdist(a.double(), b.double()) ** 2 / (2 * s * s))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    unb = (kxx.sum() - kxx.trace()) / (150 * 149) + (kyy.sum() - kyy.trace()) / (120 * 119) - 2 * kxy.mean()
    assert rbf_mmd(x, y, bandwidth=s, unbiased=False, block_size=40) == pytest.approx(biased.item(), abs=1e-12)
    assert rbf_mmd(x, y, bandwidth=s, block_size=40) == pytest.approx(unb.item(), abs=1e-12)
    multi = rbf_mmd(x, y, bandwidth=[0.5, 2.0])
    assert multi == pytest.approx(rbf_mmd(x, y, bandwidth=0.5) + rbf_mmd(x, y, bandwidth=2.0), abs=1e-12)
    assert median_bandwidth(x, y) > 0


def test_sliced_wasserstein_1d_matches_scipy_and_detects_shift():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(500, generator=g), torch.randn(500, generator=g) + 0.7
    assert sliced_wasserstein(a, b, num_projections=1, p=1) == pytest.approx(scipy_stats.wasserstein_distance(a, b), rel=1e-6)
    x = torch.randn(800, 8, generator=g)
    shift = torch.zeros(8)
    shift[0] = 1.0
    near = sliced_wasserstein(x, torch.randn(600, 8, generator=g))
    far = sliced_wasserstein(x, torch.randn(600, 8, generator=g) + shift)
    assert far > 2 * near
    assert sliced_wasserstein(x, x, num_projections=32, projection_block=5) == pytest.approx(0.0, abs=1e-12)


def test_coverage_detects_mode_dropping():
    g = torch.Generator().manual_seed(4)
    centers = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    ref = centers[torch.arange(1000) % 2] + 0.3 * torch.randn(1000, 2, generator=g)
    good = centers[torch.arange(1000) % 2] + 0.3 * torch.randn(1000, 2, generator=g)
    dropped = centers[0] + 0.3 * torch.randn(1000, 2, generator=g)
    collapsed = centers[torch.arange(1000) % 2] + 0.01 * torch.randn(1000, 2, generator=g)
    c_good = coverage(ref, good, block_size=128)
    assert c_good > 0.9
    assert coverage(ref, dropped) == pytest.approx(0.5, abs=0.05)
    assert coverage(ref, collapsed) < 0.3
    # block size does not change the value
    assert coverage(ref, good, block_size=97) == c_good
    with pytest.raises(ValueError, match="k must be"):
        coverage(ref[:3], good, k=5)


def test_bounded_memory_on_large_high_dim_sets():
    """50k x 1k would take minutes; check the blocked path on a size that still exercises many blocks."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3000, 256, generator=g), torch.randn(2500, 256, generator=g)
    e = energy_distance(x, y, block_size=512, dtype=torch.float32)
    assert 0 <= e < 0.05
    assert sliced_wasserstein(x, y, num_projections=64) < 0.1


def test_shape_errors():
    with pytest.raises(ValueError, match="same sample size"):
        energy_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="non-empty"):
        rbf_mmd(torch.randn(0, 3), torch.randn(5, 3))
    assert np.isfinite(energy_distance(torch.randn(4, 2, 2), torch.randn(6, 2, 2)))
