"""``dmvae sample``: class-conditional samples from a LatentDiT + DMVAE, as a PNG grid or an ADM npz."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmvae.cli._common import (
    add_command,
    add_dit_args,
    add_model_args,
    add_output_args,
    check_output_file,
    default_device,
    float_range,
    int_range,
    load_autoencoder,
    load_dit,
    writing,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "sample", run)
    add_dit_args(p)
    add_model_args(p)
    add_output_args(p, what="output: a PNG/JPEG grid (with --classes) or an .npz (with --num-per-class)",
                    required=False)  # fmt: skip
    p.add_argument("--classes", type=int_range(0), nargs="+", default=None, help="class ids for the grid")
    p.add_argument("--nrow", type=int_range(1), default=None, help="images per grid row (default: ~sqrt)")
    p.add_argument("--num-per-class", type=int_range(1), default=None, help="images per class for an npz")
    p.add_argument("--num-classes", type=int_range(1), default=None, help="classes for an npz (default: the DiT's)")
    p.add_argument("--batch-size", type=int_range(1), default=25, help="images per model batch")
    p.add_argument("--cfg", type=float_range(0.0), default=1.0, help="guidance scale (1 = none)")
    p.add_argument("--cfg-interval", type=float_range(0.0, 1.0), nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for t in [LO, HI] (t=0 noise, t=1 data)")
    p.add_argument("--guidance-channels", type=int_range(1), default=None,
                   help="guide only the first K channels (3 = the reference's legacy CFG)")
    p.add_argument("--steps", type=int_range(1), default=50, help="integration steps (reference points - 1)")
    p.add_argument("--method", default="euler", choices=["euler", "heun", "euler-maruyama", "dopri5"],
                   help="sampler")
    p.add_argument("--shift", type=float_range(0.0, low_open=True), default=1.0, help="time shift of the ODE grid")
    p.add_argument("--last-step-size", type=float_range(0.0, 1.0, low_open=True, high_open=True), default=0.04,
                   help="SDE final mean-step size")
    p.add_argument("--seed", type=int_range(0), default=0, help="base random seed")
    p.add_argument("--bf16", action="store_true", help="sample and decode under bf16 autocast")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _sampler_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(num_steps=args.steps, method=args.method, cfg_scale=args.cfg,
              cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
              guidance_channels=args.guidance_channels, time_shift=args.shift)  # fmt: skip
    if args.method == "euler-maruyama":
        kw["last_step_size"] = args.last_step_size
    return kw


def _check_args(args: argparse.Namespace) -> bool:
    """Validate the combination of options; returns True for npz mode."""
    if args.out is None:
        raise ValueError("choose an output: -o GRID.png (with --classes) or -o OUT.npz (with --num-per-class)")
    npz_mode = Path(args.out).suffix.lower() == ".npz"
    if npz_mode and not args.num_per_class:
        raise ValueError("an .npz output needs --num-per-class N")
    if npz_mode and args.classes:
        raise ValueError("--classes is for a grid; an .npz holds every class (--num-classes to limit them)")
    if not npz_mode and not args.classes:
        raise ValueError(f"a grid ({args.out}) needs --classes, e.g. --classes 207 360 387 (or -o OUT.npz)")
    if not npz_mode and args.num_per_class:
        raise ValueError("--num-per-class is for an .npz output; pass -o OUT.npz")
    if args.cfg_interval and args.cfg_interval[0] > args.cfg_interval[1]:
        raise ValueError(f"--cfg-interval LO HI needs LO <= HI, got {args.cfg_interval}")
    if args.method == "euler-maruyama" and args.shift != 1.0:
        raise ValueError("--shift applies to the ODE methods only; the euler-maruyama grid is not shifted")
    return npz_mode


def run(args: argparse.Namespace) -> int:
    """sample images with a LatentDiT and decode them with a DMVAE (PNG grid or ADM .npz)

    Sample latents with a LatentDiT (flow matching, t=0 noise -> t=1 data) and decode them with
    a DMVAE.
      grid:  --classes 207 360 387 -o grid.png
      npz:   --num-per-class 50 -o samples.npz   (class-balanced ADM-evaluator npz, uint8 NHWC;
             resumable; run under torchrun to split the work across ranks)
    The output kind follows the suffix of -o. Every DiT/VAE compatibility (latent channels and
    grid, class ids) is checked before the first step. To reproduce the release FID run use:
    --method euler-maruyama --steps 249 --cfg 1.
    """
    from dmvae.dist import cleanup_distributed, init_distributed, is_distributed

    npz_mode = _check_args(args)
    out = check_output_file(args.out, overwrite=args.overwrite)  # before loading anything
    owned = False
    if npz_mode:  # torchrun: every rank samples its batches, rank 0 merges
        was_initialised = is_distributed()
        info = init_distributed(device=args.device)
        owned = info.backend is not None and not was_initialised
        device = str(info.device) if info.backend is not None else default_device(args.device)
    else:
        device = default_device(args.device)
    try:
        summary = _run(args, out, device, npz_mode)
    finally:
        if owned:
            cleanup_distributed()
    if summary is not None:
        print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def _run(args: argparse.Namespace, out: Path, device: str, npz_mode: bool) -> dict | None:
    import torch

    from dmvae.generate import check_compatible, generate_npz, sample_images
    from dmvae.image import save_image_grid

    dit = load_dit(args, device)
    args.device = device
    vae = load_autoencoder(args)
    amp = torch.bfloat16 if args.bf16 else None
    kw = _sampler_kwargs(args)
    if npz_mode:
        with writing(out):
            path = generate_npz(dit, vae, out, num_per_class=args.num_per_class, num_classes=args.num_classes,
                                batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, device=device,
                                autocast_dtype=amp, overwrite=args.overwrite, **kw)  # fmt: skip
        if path is None:  # not rank 0
            return None
        return {"npz": str(path), **_jsonable(kw)}
    labels = torch.tensor(args.classes, dtype=torch.long)
    check_compatible(dit, vae, labels)
    images = []
    for lo in range(0, len(labels), args.batch_size):  # one seed scheme: image i <- sample_seed(seed, i)
        images.append(sample_images(dit, vae, labels[lo : lo + args.batch_size], seed=args.seed, first_index=lo,
                                    device=device, autocast_dtype=amp, progress=not args.quiet, **kw))  # fmt: skip
    import numpy as np

    with writing(out):
        save_image_grid(np.concatenate(images), out, args.nrow, overwrite=args.overwrite)
    return {"grid": str(out), "classes": args.classes, **_jsonable(kw)}


def _jsonable(kw: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
