"""Training throughput at cluster scale, measured in one run: data pipeline, stage loops, latent cache. JSON.

    python benchmarks/training_throughput.py                 # everything, a few minutes on a CPU
    python benchmarks/training_throughput.py --sections data flops

Sections (``--sections``, default all):

* ``data``: images/s of the input pipeline alone on a generated folder of ``--num-images`` JPEGs at
  ImageNet-like size (500x375, cut from the scikit-image photos), with the reference train transform
  at ``--image-size``, through the DataLoader path (``TrainLoader``) with 0, 1 and 2 workers.
* ``stages``: steps/s of each stage example (tiny CPU config, 32 px crops of the bundled photos) in
  one process and under ``torchrun --nproc_per_node=2`` (gloo; per-process batch unchanged, so the
  2-process run handles twice the samples per step): ``samples_per_s`` and the scaling ratio.
* ``cache``: stage-5 LatentDiT steps/s from the latent cache vs encoding online (same config), the
  ratio; the time to build the cache.
* ``flops``: the same ratio estimated from FLOP counts (``torch.utils.flop_counter``, meta tensors)
  at the release sizes: ``dmvae-l`` encoder + LatentDiT-XL/1, batch 256 (encoding one view per
  sample online; the cache reads it).
GPU figures (LatentDiT-XL/1 training MFU, ``dmvae-l`` encode / decode, SDE sampling) are
``benchmarks/gpu.py``'s.

Timings are medians of the measured steps after warm-up; ratios come from the same run. Run it on a
quiet machine: other processes on the same cores change every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# ------------------------------------------------------------------------------------------ data


def make_jpeg_folder(folder: Path, n: int) -> Path:
    """``n`` 500x375 JPEGs (quality 90) cut from the bundled photos, in 10 class folders; reused."""
    import numpy as np
    from PIL import Image

    from dmvae.training.data import SKIMAGE_PHOTOS, _skimage_photo

    if len(list(folder.rglob("*.jpg"))) == n:
        return folder
    photos = [_skimage_photo(name) for name in SKIMAGE_PHOTOS]
    rng = np.random.default_rng(0)
    for i in range(n):
        src = photos[i % len(photos)]
        scale = rng.uniform(1.0, 1.6)
        big = src.resize((round(500 * scale), round(375 * scale)), Image.BICUBIC)
        x0, y0 = rng.integers(0, big.width - 500 + 1), rng.integers(0, big.height - 375 + 1)
        out = folder / f"class{i % 10:02d}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        big.crop((x0, y0, x0 + 500, y0 + 375)).save(out, quality=90)
    return folder


def bench_data(args: argparse.Namespace, work: Path) -> dict:
    from dmvae.training.data import ImageFolder, train_transform
    from dmvae.training.sampler import TrainLoader

    folder = make_jpeg_folder(work / "jpegs", args.num_images)
    b, n_batches = args.data_batch, args.data_batches
    res: dict = {"num_images": args.num_images, "image_size": args.image_size, "batch": b, "batches": n_batches}

    dataset = ImageFolder(folder, train_transform(args.image_size))
    for workers in (0, 1, 2):
        loader = TrainLoader(dataset, b, seed=0, num_workers=workers, pin_memory=False)
        next(loader)  # worker start-up and first batch excluded
        t = time.perf_counter()
        for _ in range(n_batches):
            next(loader)
        rate = n_batches * b / (time.perf_counter() - t)
        res[f"dataloader_{workers}_workers_images_per_s"] = rate
        del loader
    return res


# ---------------------------------------------------------------------------------------- stages


def _run(cmd: list[str], procs: int, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd[1:]]
    res = subprocess.run(cmd, cwd=EXAMPLES, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def _steps_per_s(out: Path, skip: int) -> float:
    """Steps/s from metrics.jsonl (log every step) after ``skip`` warm-up steps."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= min(skip, rows[-1]["step"] - 1)]
    return (rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])


def bench_stages(args: argparse.Namespace, work: Path) -> dict:
    cores = os.cpu_count() or 2
    py, n, skip = sys.executable, args.steps, 2
    tok = ["--image-size", "32", "--batch-size", "8", "--lpips-weight", "0", "--ndf", "16", "--log-every", "1",
           "--quiet", "--stats-batches", "1", "--ckpt-every", "100000"]
    base = work / "stages"
    s1 = base / "stage1-1p"
    dit = base / "stage2-1p"
    plan = [
        ("stage1_tokenizer", ["train_tokenizer.py", "--steps", str(n), "--disc-start", "2", *tok]),
        ("stage2_5_latent_dit", ["train_latent_dit.py", "--vae", str(s1 / "vae_ema"), "--steps", str(n),
                                 "--batch-size", "16", "--log-every", "1", "--quiet", "--ckpt-every", "100000"]),
        ("stage3_dmvae", ["train_dmvae.py", "--vae", str(s1 / "vae_ema"), "--real", str(dit / "dit_ema"),
                          "--steps", str(n), "--disc-start", "2", "--vae-every", "2", "--batch-size", "8",
                          "--lpips-weight", "0", "--ndf", "16", "--log-every", "1", "--quiet",
                          "--ckpt-every", "100000"]),
        ("stage4_finetune_decoder", ["finetune_decoder.py", "--init", str(s1 / "vae"), "--steps", str(n),
                                     "--disc-start", "2", *tok]),
    ]
    res: dict = {"steps": n, "warmup_steps": skip, "cpu_cores": cores}
    for name, cmd in plan:
        row = {}
        for procs in (1, 2):
            stage_dir = {"stage1_tokenizer": "stage1", "stage2_5_latent_dit": "stage2"}.get(name, name)
            out = base / f"{stage_dir}-{procs}p"
            _run([py, *cmd, "--out", str(out), "--threads", str(max(1, cores // procs))], procs, max(1, cores // procs))
            sps = _steps_per_s(out, skip)
            batch = int(cmd[cmd.index("--batch-size") + 1]) if "--batch-size" in cmd else 8
            row[f"{procs}p_steps_per_s"] = sps
            row[f"{procs}p_samples_per_s"] = sps * batch * procs
        row["2p_vs_1p_samples"] = row["2p_samples_per_s"] / row["1p_samples_per_s"]
        res[name] = row
    return res


def bench_cache(args: argparse.Namespace, work: Path) -> dict:
    s1 = work / "stages" / "stage1-1p"
    if not (s1 / "vae_ema").is_dir():
        _run([sys.executable, "train_tokenizer.py", "--out", str(s1), "--steps", "3", "--image-size", "32",
              "--lpips-weight", "0", "--quiet", "--stats-batches", "1", "--log-every", "1"], 1, os.cpu_count() or 2)
    cache = work / "cache"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dmvae", "cache-latents", "--model", str(s1 / "vae_ema"), "--data", "skimage",
                    "-o", str(cache), "--batch-size", "16", "--num-workers", "0", "--quiet", "--overwrite"],
                   check=True, capture_output=True)
    build_s = time.perf_counter() - t
    common = ["train_latent_dit.py", "--vae", str(s1 / "vae_ema"), "--steps", str(args.steps), "--batch-size", "16",
              "--log-every", "1", "--quiet", "--ckpt-every", "100000"]
    rates = {}
    for name, extra in (("online", []), ("cache", ["--latents", str(cache)])):
        out = work / f"stage5-{name}"
        _run([sys.executable, *common, *extra, "--out", str(out)], 1, os.cpu_count() or 2)
        rates[name] = _steps_per_s(out, 2)
    return {"cache_build_s": build_s, "online_steps_per_s": rates["online"], "cache_steps_per_s": rates["cache"],
            "cache_vs_online": rates["cache"] / rates["online"], "config": "cpu-tiny LatentDiT, 32 px, batch 16"}


# ----------------------------------------------------------------------------------------- flops


def flop_counts(batch: int = 256) -> dict:
    """Per-step FLOPs at the release sizes from torch.utils.flop_counter on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from dmvae.autoencoder import DMVAE, DMVAEConfig
    from dmvae.dit import LatentDiT, LatentDiTConfig

    n = 2  # FLOPs are linear in the batch: count 2 samples, scale
    with torch.device("meta"):
        vae = DMVAE(DMVAEConfig.from_preset("dmvae-l"))
        dit = LatentDiT(LatentDiTConfig.from_preset("LightningDiT-XL/1"))
    x = torch.empty(n, 3, vae.config.image_size, vae.config.image_size, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        z = vae._encode_raw(x)  # the input checks need data; the raw path does the same arithmetic
    enc = fc.get_total_flops() / n
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vae.decoder(z)
    dec = fc.get_total_flops() / n
    dit.check_inputs = lambda x, t, y, *a: (t, y)  # value checks need data (meta tensors have none)
    zz, t = torch.empty(n, *z.shape[1:], device="meta"), torch.empty(n, device="meta")
    y, drop = torch.zeros(n, dtype=torch.long, device="meta"), torch.zeros(n, dtype=torch.bool, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        dit(zz, t, y, force_drop_ids=drop)
    fwd = fc.get_total_flops() / n
    with FlopCounterMode(display=False) as fc:
        dit(zz, t, y, force_drop_ids=drop).float().square().mean().backward()
    train = fc.get_total_flops() / n
    return {"batch": batch, "encoder_gflops_per_image": enc / 1e9, "decoder_gflops_per_image": dec / 1e9,
            "dit_xl1_forward_gflops_per_sample": fwd / 1e9, "dit_xl1_train_gflops_per_sample": train / 1e9,
            "online_step_tflops": batch * (enc + train) / 1e12, "cache_step_tflops": batch * train / 1e12,
            "estimated_cache_vs_online": (enc + train) / train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", nargs="+", default=None, choices=["data", "stages", "cache", "flops"])
    p.add_argument("--workdir", default=None, help="keep generated data and runs here (default: a temp dir)")
    p.add_argument("--num-images", type=int, default=1000, help="JPEGs in the generated folder")
    p.add_argument("--image-size", type=int, default=256, help="crop size of the data section")
    p.add_argument("--data-batch", type=int, default=32)
    p.add_argument("--data-batches", type=int, default=8, help="measured batches per data configuration")
    p.add_argument("--steps", type=int, default=12, help="steps per stage run (first 2 not timed; >= 4)")
    args = p.parse_args()
    args.steps = max(args.steps, 4)
    sections = args.sections or ["data", "stages", "cache", "flops"]
    result: dict = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor(),
                    "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in sections:
            t = time.perf_counter()
            if name == "data":
                result["data_pipeline"] = bench_data(args, work)
            elif name == "stages":
                result["stage_loops"] = bench_stages(args, work)
            elif name == "cache":
                result["stage5_cache"] = bench_cache(args, work)
            elif name == "flops":
                result["release_flops"] = flop_counts()
            result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
