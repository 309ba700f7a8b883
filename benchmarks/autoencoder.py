"""Throughput and peak memory of DMVAE encode / decode, printed as JSON.

    python benchmarks/autoencoder.py                       # mid-size config, batch 1/4/16
    python benchmarks/autoencoder.py --image-size 256 --device cuda
    python benchmarks/autoencoder.py --preset dmvae-l --batch-sizes 1 8

For every batch size it times ``encode`` and ``decode`` (random weights: speed and memory do not
depend on the values) and measures peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` above the memory held before the call;
- CPU (Linux): peak resident set size above the RSS before the call, read from ``VmHWM`` in
  ``/proc/self/status`` after resetting it with ``/proc/self/clear_refs`` (no extra package);
  before each call the heap's free pages are returned (``malloc_trim``) and glibc mmaps every
  block above 64 KiB, so freed memory really leaves the RSS.

Timings on a shared machine are noisy: use ``--repeats 3`` (best of 3) on a quiet one.

Baseline in the same run: the largest batch again with slicing on (``chunk_size=1``), reported as
ratios sliced / whole-batch for throughput and peak memory.

Default model ("mid"): a DINOv2-S-sized encoder (384-d, 12 blocks, 6 heads), z=16, decoder 64 x
(1,2,4,4), 2+1 blocks per level (35M parameters). The default image size is 128 px on CPU (the
default run then takes ~1-2 minutes on 2 cores) and 256 px on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import torch

from dmvae.autoencoder import DMVAE, DMVAEConfig

MID_CONFIG = dict(
    encoder="vit_small_patch14_dinov2.lvd142m",
    bottleneck_dim=1024,
    z_channels=16,
    decoder_channels=64,
    decoder_channel_mult=(1, 2, 4, 4),
    decoder_num_res_blocks=2,
)


# ---- memory probes ----------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _return_freed_memory_to_os() -> None:
    """Make glibc serve every allocation above 64 KiB with its own mmap (a fixed threshold, no
    dynamic growth), so freed tensors leave the RSS and each call's peak is measured from scratch
    instead of being hidden in the heap's free lists."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    try:  # hand the heap's free pages back first, so the next call's peak is not hidden in them
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``.peak_mb`` = peak memory above the level at entry (None if unknown)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._ok = _reset_cpu_peak()
            self._base = _proc_status_kb("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            hwm = _proc_status_kb("VmHWM")
            if self._ok and hwm is not None and self._base is not None:
                self.peak_mb = max(hwm - self._base, 0) / 1024


# ---- measurement ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(model: DMVAE, op: str, data: torch.Tensor, chunk_size: int | None, autocast: bool) -> None:
    fn = model.encode if op == "encode" else model.decode
    with torch.no_grad():
        fn(data, chunk_size=chunk_size, autocast=autocast)


def time_point(
    model: DMVAE, op: str, data: torch.Tensor, *, chunk_size: int | None, autocast: bool, repeats: int
) -> float:
    """Best wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        _sync(model.device)
        start = time.perf_counter()
        _run(model, op, data, chunk_size, autocast)
        _sync(model.device)
        times.append(time.perf_counter() - start)
    return min(times)


def memory_point(
    model: DMVAE, op: str, data: torch.Tensor, *, chunk_size: int | None, autocast: bool
) -> float | None:
    """Peak memory of one call above the level before it (MB)."""
    with PeakMemory(model.device) as mem:
        _run(model, op, data, chunk_size, autocast)
    return None if mem.peak_mb is None else round(mem.peak_mb, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default=None, choices=DMVAEConfig.preset_names(), help="a DMVAE preset instead of the mid config"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--image-size", type=int, default=None, help="pixels (default: 128 on CPU, 256 on CUDA)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (the reference's GPU mode)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the slicing-on comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the (CPU: separate) memory pass")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    image_size = args.image_size or (256 if device.type == "cuda" else 128)
    config = DMVAEConfig.from_preset(args.preset) if args.preset else DMVAEConfig(**MID_CONFIG)
    if image_size % config.patch_size:
        parser.error(f"--image-size must be a multiple of the patch size {config.patch_size}")
    torch.manual_seed(0)
    model = DMVAE(config).eval().to(device=device, dtype=getattr(torch, args.dtype))

    largest = max(args.batch_sizes)
    images = torch.rand(largest, 3, image_size, image_size, device=device) * 2 - 1
    with torch.no_grad():  # warm-up (allocator, kernels, lazy imports)
        model.decode(model.encode(images[:1]))
        latents = model.encode(images, chunk_size=4)
    points = [
        (op, data[:b], None) for op, data in (("encode", images), ("decode", latents)) for b in args.batch_sizes
    ]
    if not args.no_baseline and largest > 1:
        points += [("encode", images, 1), ("decode", latents, 1)]

    # Pass 1: timing with the normal allocator. Pass 2 (CPU): memory, with glibc mmapping every
    # block > 64 KiB so RSS tracks live tensors; that slows allocation down, hence two passes.
    kw = dict(autocast=args.autocast)
    results = []
    for op, data, chunk in points:
        seconds = time_point(model, op, data, chunk_size=chunk, repeats=args.repeats, **kw)
        results.append({
            "op": op,
            "batch": data.shape[0],
            "sliced": chunk is not None,
            "seconds": round(seconds, 4),
            "images_per_s": round(data.shape[0] / seconds, 3),
            "peak_mem_mb": None,
        })
    if not args.no_memory:
        if device.type == "cpu":
            _return_freed_memory_to_os()
        for row, (op, data, chunk) in zip(results, points):
            row["peak_mem_mb"] = memory_point(model, op, data, chunk_size=chunk, **kw)

    comparison = {}
    for op in ("encode", "decode"):
        whole = next((r for r in results if r["op"] == op and r["batch"] == largest and not r["sliced"]), None)
        sliced = next((r for r in results if r["op"] == op and r["sliced"]), None)
        if whole and sliced:
            mem_ratio = (
                round(sliced["peak_mem_mb"] / whole["peak_mem_mb"], 3)
                if sliced["peak_mem_mb"] and whole["peak_mem_mb"]
                else None
            )
            comparison[op] = {
                "batch": largest,
                "throughput_ratio_sliced_vs_whole": round(sliced["images_per_s"] / whole["images_per_s"], 3),
                "peak_mem_ratio_sliced_vs_whole": mem_ratio,
            }

    report = {
        "benchmark": "dmvae.autoencoder",
        "model": args.preset or "mid",
        "config": config.to_dict(),
        "parameters": model.parameter_counts(),
        "image_size": image_size,
        "latent_shape": list(model.latent_shape(image_size)),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "dtype": args.dtype,
        "autocast": args.autocast,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "memory_probe": "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS (/proc)",
        "results": results,
        "slicing_vs_whole_batch": comparison,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
