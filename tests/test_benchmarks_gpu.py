"""benchmarks/gpu.py runs end to end on the CPU with --dry-run and prints the documented JSON."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def gpu_bench(load_benchmark):
    return load_benchmark("gpu")


def test_peak_table(gpu_bench):
    assert gpu_bench.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_bench.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_bench.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_bench.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_bench.peak_bf16_tflops("Some Future GPU") is None


@pytest.mark.slow  # runs every benchmark section end to end
def test_dry_run_prints_every_section(gpu_bench, capsys):
    result = gpu_bench.main(["--dry-run", "--iters", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert printed["dry_run"] is True and set(printed["sections"]) == set(gpu_bench.SECTIONS)

    train = printed["sections"]["dit_training"]
    assert train["flops_per_step"] > 0 and train["batch"] == 4 and train["mfu_target"] == 0.40
    assert set(train["runs"]) == {"eager", "compile"}
    for run in train["runs"].values():
        assert run["step_s"] > 0 and run["images_per_s"] > 0 and math.isfinite(run["loss"])
        assert {"mfu", "achieved_tflops", "peak_memory_gib", "warmup_s"} <= set(run)
    # both runs start from the same weights and data: the same first-step loss scale
    assert train["runs"]["eager"]["loss"] == pytest.approx(train["runs"]["compile"]["loss"], rel=0.2)

    ae = printed["sections"]["autoencoder"]
    assert set(ae["runs"]) == {"fp32", "bf16", "bf16+compile"}
    for name, run in ae["runs"].items():
        assert run["encode_images_per_s"] > 0 and run["decode_images_per_s"] > 0
        if name != "fp32":  # bf16 differs from fp32, but only by bf16 rounding
            assert 0 < run["decode_max_abs_diff_vs_fp32"] < 0.5
            assert 0 < run["encode_max_abs_diff_vs_fp32"] < 0.5

    sde = printed["sections"]["sde_sampling"]
    assert sde["grid_points"] == 4 and set(sde["runs"]) == {"eager", "compile", "compile_whole_cudagraphs"}
    for name, run in sde["runs"].items():
        assert run["finite"] and run["wall_s"] > 0
        if name != "eager":  # the same weights and noise: bf16-level agreement
            assert run["max_abs_diff_vs_eager"] < 0.05
