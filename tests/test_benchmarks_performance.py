"""benchmarks/performance.py's Amdahl ceiling: the share of an eager call spent in dense kernels."""

from __future__ import annotations


import pytest
import torch


@pytest.fixture(scope="module")
def perf_bench(load_benchmark):
    return load_benchmark("performance")


def test_dense_share_separates_gemm_from_elementwise(perf_bench):
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.randn(1 << 20)
    gemm = perf_bench.dense_share(lambda: [a @ b for _ in range(4)])
    pointwise = perf_bench.dense_share(lambda: [torch.sigmoid(x).mul_(2).add_(1) for _ in range(4)])
    mixed = perf_bench.dense_share(lambda: (torch.nn.functional.linear(a, b).sigmoid() * 2).sum())
    assert gemm > 0.9 and pointwise == 0.0 and 0.0 < mixed < 1.0, (gemm, pointwise, mixed)
