"""LatentDiT forward and sampler throughput, with and without classifier-free guidance. Prints JSON.

    python benchmarks/sampling.py                      # Mini/1, B/1, XL/1 on CPU (+ CUDA if present)
    python benchmarks/sampling.py --models LightningDiT-B/1 --batch-sizes 1 8 --iters 5

Latent 16x16x32 (the DMVAE release), random weights (speed does not depend on their values),
eval mode, ``torch.no_grad``. For each model / batch size / device it reports

* ``forward_per_s``: DiT forward passes per second (batch B), and ``forward_cfg_per_s`` for the guided
  velocity (one forward on the doubled batch, as the sampler runs it);
* ``sampler_steps_per_s`` / ``sampler_steps_cfg_per_s``: Euler steps per second through
  :func:`dmvae.samplers.sample` (includes the update and guidance arithmetic);
* ``cfg_cost``: time ratio guided / unguided for the sampler, measured in the same run.

XL/1 is ~0.7 B parameters; on a CPU one batch-8 forward takes tens of seconds, so by default XL/1 runs
at batch 1 only on CPU (``--cpu-xl-batch8`` to include batch 8) with ``--xl-iters`` iterations.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dmvae.models import create_model
from dmvae.samplers import sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call (best of the measured calls, after warm-up)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_one(name: str, batch: int, device: torch.device, dtype: torch.dtype, iters: int,
              warmup: int, steps: int) -> dict:
    model = create_model(name, input_size=16, in_channels=32).to(device=device, dtype=dtype).eval()
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g).to(device, dtype)
    y = torch.arange(batch, device=device) % c.num_classes
    t = torch.full((batch,), 0.5, device=device, dtype=dtype)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, c.num_classes)])
    with torch.no_grad():
        fwd = _timeit(lambda: model(x, t, y), iters, warmup, device)
        fwd_cfg = _timeit(lambda: model.forward_with_cfg(xx, tt, yy, 4.0), iters, warmup, device)
        smp = _timeit(lambda: sample(model, x, y, num_steps=steps), iters, 0, device)
        smp_cfg = _timeit(lambda: sample(model, x, y, num_steps=steps, cfg_scale=4.0), iters, 0, device)
    del model
    return {
        "model": name, "batch": batch, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "forward_per_s": round(1 / fwd, 4),
        "forward_cfg_per_s": round(1 / fwd_cfg, 4),
        "images_per_s_forward": round(batch / fwd, 4),
        "sampler_steps_per_s": round(steps / smp, 4),
        "sampler_steps_cfg_per_s": round(steps / smp_cfg, 4),
        "cfg_cost": round(smp_cfg / smp, 3),
        "forward_cfg_cost": round(fwd_cfg / fwd, 3),
        "iters": iters, "sampler_steps": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+",
                   default=["LightningDiT-Mini/1", "LightningDiT-B/1", "LightningDiT-XL/1"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--iters", type=int, default=2, help="timed calls per measurement (best is kept)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--xl-iters", type=int, default=1, help="timed calls for XL/1 and larger")
    p.add_argument("--steps", type=int, default=2, help="Euler steps per timed sampler call")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if available")
    p.add_argument("--cpu-xl-batch8", action="store_true", help="also run XL/1 at batch 8 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results = []
    for dev in devices:
        device = torch.device(dev)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for name in args.models:
            big = any(s in name for s in ("XL", "1p0B", "1p6B"))
            for batch in args.batch_sizes:
                if big and device.type == "cpu" and batch > 1 and not args.cpu_xl_batch8:
                    results.append({"model": name, "batch": batch, "device": dev,
                                    "skipped": "XL on CPU at batch > 1 (pass --cpu-xl-batch8)"})
                    continue
                iters = args.xl_iters if big else args.iters
                warmup = 0 if big and device.type == "cpu" else args.warmup
                r = bench_one(name, batch, device, dtype, iters, warmup,
                              steps=1 if big and device.type == "cpu" else args.steps)
                results.append(r)
                print(json.dumps(r), flush=True)
    print(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
