"""Each CPU optimisation of dmvae as a speed ratio against the same code without it, printed as JSON.

    python benchmarks/performance.py                          # all four workloads (~5-10 min, 2 cores)
    python benchmarks/performance.py --only dit_forward cfg_sampling --repeats 5
    python benchmarks/performance.py --quick                  # tiny shapes, checks the script runs

Workloads (the sizes of issue 14's table):

* ``dit_forward``: LatentDiT-B/1 forward, batch 8, 16x16x32 latents, no grad;
* ``dit_train_step``: LatentDiT-B/1 flow-matching loss + backward + AdamW step, batch 8;
* ``cfg_sampling``: Euler ODE, CFG 1.5, LightningDiT-Mini/1, 50 steps, batch 8;
* ``autoencoder``: encode + decode, batch 4 at 256 px, DINOv2-B with 6 blocks + a ch-64 decoder
  (64 x (1, 2, 4, 4), 2 + 1 blocks per level, z = 32).

Every workload times a baseline (eager, default layout) and its variants in ONE process,
interleaved (baseline, variant 1, ..., baseline, variant 1, ...) so that a change in machine
load hits all of them alike, and reports medians. Compilation happens in an untimed warm-up call
whose duration is reported as ``compile_s``. Each variant also reports ``max_abs_diff`` from the
baseline's output (compiled kernels sum in another order). Ratios are ``baseline / variant``
seconds: > 1 is faster. Random weights: speed does not depend on their values.

Each workload also reports ``eager_dense_share``, the fraction of an eager call's CPU time spent in
GEMMs, attention and convolutions (torch.profiler), and ``fusion_ceiling = 1 / eager_dense_share``:
compilation fuses the rest, so while it leaves the dense kernels as they are, no compiled variant
can be faster than that ceiling (Amdahl).

Timings on a shared machine are noisy: quote figures from a quiet one (``--repeats 5``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import randomize_adaln  # noqa: E402  (benchmarks/_common.py)
from dmvae.autoencoder import DMVAE, DMVAEConfig
from dmvae.models import create_model
from dmvae.samplers import sample
from dmvae.transport import FlowMatching

WORKLOADS = ("dit_forward", "dit_train_step", "cfg_sampling", "autoencoder")
# issue 14's acceptance: the default compile() against compile off, per workload
TARGETS = {
    "dit_forward": ("compile_regional", 1.25),
    "dit_train_step": ("compile_regional", 1.25),
    "cfg_sampling": ("compile_regional", 1.2),
    "autoencoder": ("compile+channels_last", 1.25),  # DMVAE.compile() defaults
}

# the autoencoder of the table: DINOv2-B (6 of its 12 blocks) + a ch-64 decoder
AE_CONFIG = dict(
    encoder="vit_base_patch14_dinov2.lvd142m",
    encoder_kwargs={"depth": 6},
    z_channels=32,
    decoder_channels=64,
    decoder_channel_mult=(1, 2, 4, 4),
    decoder_num_res_blocks=2,
)
# --quick: the same code paths at toy sizes
QUICK = dict(dit="LightningDiT-Mini/1", dit_kw=dict(depth=2, hidden_size=64, num_heads=2, input_size=4,
             in_channels=8, num_classes=10), batch=2, steps=3, image=64,
             ae=dict(AE_CONFIG, encoder_kwargs={"embed_dim": 96, "depth": 2, "num_heads": 2},
                     z_channels=8, decoder_channels=32, decoder_num_res_blocks=1, bottleneck_dim=128))


class Variant:
    """A named callable plus the result it produced during warm-up."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self.name, self.fn = name, fn
        self.times: list[float] = []
        self.compile_s = 0.0
        self.output: torch.Tensor | None = None

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        out = self.fn()
        self.compile_s = time.perf_counter() - t0
        self.output = out.detach().float() if isinstance(out, torch.Tensor) else None

    def run(self) -> None:
        t0 = time.perf_counter()
        self.fn()
        self.times.append(time.perf_counter() - t0)


# dense kernels that fusion cannot speed up: GEMMs, attention, convolutions (forward and backward)
DENSE_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
             "aten::mkldnn_convolution", "aten::convolution_backward", "aten::mkldnn_linear",
             "aten::_weight_int8pack_mm")


def dense_share(fn: Callable[[], Any]) -> float:
    """Fraction of one eager call's CPU time spent in dense kernels (GEMM, attention, convolution).

    Compilation fuses and removes the *other* work (norms, activations, modulation, copies), so
    ``1 / dense_share`` bounds what any fusion can gain while the dense kernels stay the same
    (Amdahl): the ceiling reported next to the measured ratios.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dense = sum(e.self_cpu_time_total for e in events if e.key.startswith(DENSE_OPS))
    return dense / total if total > 0 else float("nan")


def _measure(variants: list[Variant], repeats: int) -> dict[str, Any]:
    """Warm up each variant, then time them interleaved; the first variant is the baseline."""
    for v in variants:
        v.warm_up()
    share = dense_share(variants[0].fn)
    for _ in range(repeats):
        for v in variants:
            v.run()
    base = variants[0]
    base_s = statistics.median(base.times)
    out: dict[str, Any] = {"baseline": base.name, "baseline_s": round(base_s, 4),
                           "eager_dense_share": round(share, 3), "fusion_ceiling": round(1 / share, 3),
                           "variants": {}}
    for v in variants[1:]:
        s = statistics.median(v.times)
        diff = None
        if v.output is not None and base.output is not None:
            diff = (v.output.double() - base.output.double()).abs().max().item()
        out["variants"][v.name] = {
            "median_s": round(s, 4),
            "speedup": round(base_s / s, 3),
            "compile_s": round(v.compile_s, 2),
            "max_abs_diff": diff,
        }
    return out


# ---- workloads -----------------------------------------------------------------------------


def _dit(args: argparse.Namespace, name: str) -> torch.nn.Module:
    if args.quick:
        return create_model(QUICK["dit"], **QUICK["dit_kw"])  # type: ignore[arg-type]
    return create_model(name, num_classes=1000)


def _dit_inputs(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, c.num_classes, (batch,), generator=g)
    return x, t, y


def bench_dit_forward(args: argparse.Namespace) -> dict[str, Any]:
    base = randomize_adaln(_dit(args, "LightningDiT-B/1")).eval()
    x, t, y = _dit_inputs(base, args.batch)
    regional = copy.deepcopy(base).compile()
    whole = copy.deepcopy(base).compile(regional=False)

    def fwd(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return m(x, t, y)
        return run

    return _measure([Variant("eager", fwd(base)), Variant("compile_regional", fwd(regional)),
                     Variant("compile_whole", fwd(whole))], args.repeats)


def bench_dit_train_step(args: argparse.Namespace) -> dict[str, Any]:
    base = randomize_adaln(_dit(args, "LightningDiT-B/1")).train()
    x1, _, y = _dit_inputs(base, args.batch)
    fm = FlowMatching()

    def step_fn(model: torch.nn.Module, fused: bool) -> Callable[[], torch.Tensor]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
        g = torch.Generator()

        def run() -> torch.Tensor:
            g.manual_seed(0)  # the same noise, times and label drops every step
            drop = torch.rand(y.shape, generator=g) < model.config.class_dropout_prob  # not the global RNG
            opt.zero_grad(set_to_none=True)
            loss = fm.loss(model, x1, y, generator=g, force_drop_ids=drop).loss
            loss.backward()
            opt.step()
            return loss.detach()
        return run

    # every variant starts from the same weights; the steps change them, so only the first
    # (warm-up) loss is compared
    return _measure([
        Variant("eager", step_fn(copy.deepcopy(base), fused=False)),
        Variant("fused_adamw", step_fn(copy.deepcopy(base), fused=True)),
        Variant("compile_regional", step_fn(copy.deepcopy(base).compile(), fused=False)),
        Variant("compile_regional+fused_adamw", step_fn(copy.deepcopy(base).compile(), fused=True)),
    ], args.repeats)


def bench_cfg_sampling(args: argparse.Namespace) -> dict[str, Any]:
    base = randomize_adaln(_dit(args, "LightningDiT-Mini/1")).eval()
    noise, _, labels = _dit_inputs(base, args.batch)
    steps = args.steps

    def run_fn(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: sample(m, noise, labels, num_steps=steps, method="euler", cfg_scale=1.5)

    return _measure([Variant("eager", run_fn(base)),
                     Variant("compile_regional", run_fn(copy.deepcopy(base).compile())),
                     Variant("compile_whole", run_fn(copy.deepcopy(base).compile(regional=False)))],
                    max(1, args.repeats - 1))


def bench_autoencoder(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK["ae"] if args.quick else AE_CONFIG
    size = QUICK["image"] if args.quick else 256
    base = DMVAE(DMVAEConfig(image_size=size, **cfg)).eval()  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.ae_batch, 3, size, size, generator=g) * 2 - 1

    def run_fn(m: DMVAE) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return m.decode(m.encode(images, normalize=False), normalize=False)
        return run

    def variant(**kw: Any) -> DMVAE:
        return copy.deepcopy(base).compile(**kw)

    return _measure([
        Variant("eager", run_fn(base)),
        Variant("channels_last", run_fn(_channels_last(copy.deepcopy(base)))),
        Variant("compile", run_fn(variant(channels_last=False))),
        Variant("compile+channels_last", run_fn(variant(channels_last=True))),
        Variant("compile+channels_last+freezing", run_fn(variant(channels_last=True, freezing=True))),
    ], args.repeats)


def _channels_last(m: DMVAE) -> DMVAE:
    m.decoder.set_memory_format(torch.channels_last)
    return m


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "dit_forward": bench_dit_forward,
    "dit_train_step": bench_dit_train_step,
    "cfg_sampling": bench_cfg_sampling,
    "autoencoder": bench_autoencoder,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                   help="run a subset of the workloads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="toy sizes: check that the script runs")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = QUICK["batch"] if args.quick else 8
    args.ae_batch = 2 if args.quick else 4
    args.steps = QUICK["steps"] if args.quick else 50
    # every compiled module shares nn.Module._call_impl's dynamo cache: room for all variants
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    result: dict[str, Any] = {
        "benchmark": "dmvae CPU optimisations (ratios vs the same code without them)",
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "quick": args.quick,
        "repeats": args.repeats,
        "workloads": {},
    }
    t_all = time.perf_counter()
    for name in args.only:
        torch._dynamo.reset()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        result["workloads"][name] = BENCHES[name](args)
        result["workloads"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
        # progress on stderr (the JSON on stdout comes at the end)
        print(f"[performance] {name}: {json.dumps(result['workloads'][name])}", file=sys.stderr)
    result["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    result["summary"] = {}
    for name, res in result["workloads"].items():
        default, target = TARGETS[name]
        best = max(res["variants"], key=lambda v: res["variants"][v]["speedup"])
        speedup = res["variants"][default]["speedup"]
        result["summary"][name] = {"compile_default": default, "speedup": speedup, "target": target,
                                   "met": speedup >= target, "fusion_ceiling": res["fusion_ceiling"],
                                   "best_variant": best,
                                   "best_speedup": res["variants"][best]["speedup"]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
