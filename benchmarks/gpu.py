"""GPU benchmark of dmvae (one GPU, <= 8 minutes on an H100/H200), printed as JSON.

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --only dit_training   # a subset: dit_training, autoencoder, sde_sampling
    python benchmarks/gpu.py --dry-run             # tiny shapes on CPU: checks the script and its JSON

Sections (random weights: speed does not depend on their values):

* ``dit_training``: LatentDiT-XL/1 (16x16x32 latents, 1000 classes) flow-matching training steps
  (loss + backward + fused AdamW) under bf16 autocast, eager vs regional ``compile()``:
  step time, images/s, model FLOP utilisation ``MFU = FLOPs per step / step time / peak`` with the
  FLOPs of one forward + backward counted by ``torch.utils.flop_counter.FlopCounterMode`` and the
  dense bf16 peak taken from :data:`_common.PEAK_BF16_TFLOPS` by device name (target: MFU >= 0.40);
* ``autoencoder``: ``dmvae-l`` encode and decode images/s at 256 px in float32 vs bf16 autocast
  (and bf16 + ``compile()``), with the max-abs difference of the bf16 outputs from float32;
* ``sde_sampling``: Euler-Maruyama with the release's 250 grid points (``num_steps=249``), batch
  64, LatentDiT-XL/1 in bf16, eager vs regional compile vs whole-model compile with CUDA graphs
  (``mode="reduce-overhead"``; the batch is fixed, so the shapes are static).

Every entry reports the peak allocated CUDA memory of its timed runs. Settings used throughout:
TF32 matmuls/convolutions for the float32 parts, ``scaled_dot_product_attention`` with torch's
kernel choice (flash / memory-efficient for bf16 heads of 72 and 64 dims), fused AdamW.

``--dry-run`` runs every section on the CPU at toy sizes with ``backend="eager"`` compiles (no
C++ build), so the test suite can check the JSON; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_bf16_tflops, randomize_adaln  # noqa: E402  (benchmarks/_common.py)
from dmvae.autoencoder import DMVAE, DMVAEConfig
from dmvae.dit import LatentDiT
from dmvae.models import create_model
from dmvae.samplers import sample
from dmvae.transport import FlowMatching

SECTIONS = ("dit_training", "autoencoder", "sde_sampling")

# ---- helpers ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, device: torch.device, dry_run: bool) -> None:
        self.device = device
        self.dry_run = dry_run
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3) if self.cuda else None

    def time(self, fn: Callable[[], Any], warmup: int, iters: int) -> tuple[float, float, Any]:
        """(seconds of the warm-up calls, median seconds per timed call, last output)."""
        self.sync()
        t0 = time.perf_counter()
        out = None
        for _ in range(warmup):
            out = fn()
        self.sync()
        warm = time.perf_counter() - t0
        self.reset_peak()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return warm, statistics.median(times), out

    def autocast(self, enabled: bool = True) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _compile_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"backend": "eager"} if args.dry_run else {}


def _dit(args: argparse.Namespace, device: torch.device) -> LatentDiT:
    if args.dry_run:
        model = create_model("LightningDiT-Mini/1", depth=2, hidden_size=64, num_heads=2, input_size=4,
                             in_channels=8, num_classes=10)
    else:
        model = create_model("LightningDiT-XL/1", num_classes=1000)
    return randomize_adaln(model).to(device)


def _latents(model: LatentDiT, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g).to(device)
    y = torch.randint(0, c.num_classes, (batch,), generator=g).to(device)
    return x, y


# ---- sections --------------------------------------------------------------------------------


def dit_training(args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    base = _dit(args, b.device).train()
    batch = args.train_batch
    x1, y = _latents(base, batch, b.device)
    fm = FlowMatching()

    def train_step(model: LatentDiT) -> Callable[[], torch.Tensor]:
        # fused AdamW: one kernel for the whole update (CPU too since torch 2.4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

        def step() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with b.autocast():
                loss = fm.loss(model, x1, y).loss
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    # FLOPs of one forward + backward (the optimizer's elementwise work is not counted, as usual)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, b.autocast():
        fm.loss(base, x1, y).loss.backward()
    flops = counter.get_total_flops()
    base.zero_grad(set_to_none=True)
    peak = peak_bf16_tflops(torch.cuda.get_device_name(b.device)) if b.cuda else None

    out: dict[str, Any] = {"model": "LightningDiT-XL/1" if not args.dry_run else "tiny", "batch": batch,
                           "dtype": "bf16 autocast", "flops_per_step": flops,
                           "peak_bf16_tflops": peak, "mfu_target": 0.40, "runs": {}}
    for name, compiled in (("eager", False), ("compile", True)):
        model = copy.deepcopy(base)
        if compiled:
            model.compile(**_compile_kw(args))
        warm, sec, loss = b.time(train_step(model), args.warmup, args.iters)
        tflops = flops / sec / 1e12
        out["runs"][name] = {
            "step_s": round(sec, 5),
            "images_per_s": round(batch / sec, 2),
            "achieved_tflops": round(tflops, 2),
            "mfu": round(tflops / peak, 4) if peak else None,
            "warmup_s": round(warm, 2),
            "loss": float(loss),
            "peak_memory_gib": b.peak_gib(),
        }
        del model
    return out


def autoencoder(args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    if args.dry_run:
        cfg, size = DMVAEConfig.from_preset("dmvae-tiny", image_size=32), 32
    else:
        cfg, size = DMVAEConfig.from_preset("dmvae-l"), 256
    base = DMVAE(cfg).eval().to(b.device)
    batch = args.ae_batch
    images = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(b.device)
    with torch.no_grad():
        latents = base.encode(images)
    out: dict[str, Any] = {"model": "dmvae-l" if not args.dry_run else "dmvae-tiny", "batch": batch,
                           "image_size": size, "runs": {}}
    reference: dict[str, torch.Tensor] = {}
    variants = (("fp32", False, False), ("bf16", True, False), ("bf16+compile", True, True))
    for name, bf16, compiled in variants:
        model = copy.deepcopy(base).compile(**_compile_kw(args)) if compiled else base
        run: dict[str, Any] = {}
        for part, fn in (
            ("encode", lambda m=model, a=bf16: m.encode(images, autocast=a)),
            ("decode", lambda m=model, a=bf16: m.decode(latents, autocast=a)),
        ):
            with torch.no_grad():
                warm, sec, result = b.time(fn, args.warmup, args.iters)
            run[f"{part}_images_per_s"] = round(batch / sec, 2)
            run[f"{part}_warmup_s"] = round(warm, 2)
            run[f"{part}_peak_memory_gib"] = b.peak_gib()
            if name == "fp32":
                reference[part] = result.float()
            else:
                run[f"{part}_max_abs_diff_vs_fp32"] = (result.float() - reference[part]).abs().max().item()
        out["runs"][name] = run
    return out


def sde_sampling(args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    base = _dit(args, b.device).eval()
    noise, labels = _latents(base, args.sample_batch, b.device, seed=2)
    steps = args.sde_steps
    out: dict[str, Any] = {"model": "LightningDiT-XL/1" if not args.dry_run else "tiny", "method": "euler-maruyama",
                           "grid_points": steps + 1, "batch": args.sample_batch, "cfg_scale": args.cfg,
                           "dtype": "bf16 autocast", "runs": {}}
    variants: list[tuple[str, dict[str, Any] | None]] = [
        ("eager", None),
        ("compile", {}),
        ("compile_whole_cudagraphs", {"regional": False, "mode": "reduce-overhead", "dynamic": False}),
    ]
    first: torch.Tensor | None = None
    for name, kw in variants:
        model = base
        if kw is not None:
            model = copy.deepcopy(base)
            if args.dry_run:
                kw = {k: v for k, v in kw.items() if k != "mode"}
            model.compile(**kw, **_compile_kw(args))

        def run(m: LatentDiT = model) -> torch.Tensor:
            g = torch.Generator(b.device).manual_seed(0)
            with b.autocast():
                return sample(m, noise, labels, num_steps=steps, method="euler-maruyama",
                              cfg_scale=args.cfg, generator=g)

        warm, sec, x = b.time(run, 1, 1)
        entry = {"wall_s": round(sec, 3), "warmup_s": round(warm, 2), "peak_memory_gib": b.peak_gib(),
                 "finite": bool(torch.isfinite(x).all())}
        if first is None:
            first = x.float()
        else:
            entry["max_abs_diff_vs_eager"] = (x.float() - first).abs().max().item()
        out["runs"][name] = entry
        del model
    return out


RUNNERS: dict[str, Callable[[argparse.Namespace, Bench], dict[str, Any]]] = {
    "dit_training": dit_training,
    "autoencoder": autoencoder,
    "sde_sampling": sde_sampling,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (checks the script and JSON)")
    p.add_argument("--train-batch", type=int, default=None, help="DiT training batch (default 128; dry run 4)")
    p.add_argument("--ae-batch", type=int, default=None, help="autoencoder batch (default 32; dry run 2)")
    p.add_argument("--sample-batch", type=int, default=None, help="SDE batch (default 64; dry run 2)")
    p.add_argument("--sde-steps", type=int, default=None, help="SDE steps (default 249 = 250 grid points)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the SDE run (1 = none)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (compilation) (default 3)")
    p.add_argument("--iters", type=int, default=None, help="timed calls, median (default 10)")
    args = p.parse_args(argv)
    dry = args.dry_run
    defaults = dict(train_batch=(4, 128), ae_batch=(2, 32), sample_batch=(2, 64), sde_steps=(3, 249),
                    warmup=(1, 3), iters=(2, 10))
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if dry else full)
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")

    if dry:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        p.error("no CUDA device: benchmarks/gpu.py needs a GPU (use --dry-run to check it on the CPU)")
    else:
        device = torch.device("cuda")
        # TF32 for whatever still runs in float32 (the fp32 autoencoder baseline, norms' matmuls)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    result: dict[str, Any] = {
        "benchmark": "dmvae GPU",
        "dry_run": dry,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tf32": device.type == "cuda",
        "sections": {},
    }
    bench = Bench(device, dry)
    t_all = time.perf_counter()
    for name in args.only:
        torch._dynamo.reset()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            section = RUNNERS[name](args, bench)
        except torch.cuda.OutOfMemoryError as e:  # report, keep going with the other sections
            section = {"error": f"out of memory: {e}".splitlines()[0]}
        section["wall_s"] = round(time.perf_counter() - t0, 1)
        result["sections"][name] = section
        print(f"[gpu] {name} done in {section['wall_s']}s", file=sys.stderr)
    result["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
