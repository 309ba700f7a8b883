"""``dmvae sample``: class-conditional samples from a LatentDiT + DMVAE, as a PNG grid or an ADM npz."""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample images with a LatentDiT and decode them with a DMVAE (PNG grid or ADM .npz)",
        description="Sample latents with a LatentDiT (flow matching, t=0 noise -> t=1 data) and "
        "decode them with a DMVAE. Either --classes ... -o grid.png for a PNG grid, or "
        "--num-per-class N --npz OUT.npz for a class-balanced ADM-evaluator npz (uint8 NHWC, "
        "resumable; run under torchrun to split the work across ranks). To reproduce the release "
        "FID run use: --method euler-maruyama --steps 249 --cfg 1.",
    )
    p.add_argument("--dit", required=True, help="LatentDiT: our directory, .safetensors, reference "
                   "ep*.pt, or a Hugging Face repo id")
    p.add_argument("--dit-config", default=None,
                   help="preset name or config.json path, for weights that come without a config "
                   "(reference ep*.pt); default: the stored config, else LightningDiT-XL/1")
    p.add_argument("--dit-raw", action="store_true", help="load the raw (non-EMA) DiT weights")
    p.add_argument("--dit-filename", default=None, help="file inside a DiT directory/repo, e.g. ep800.pt")
    p.add_argument("--vae", required=True, help="DMVAE: directory, file or Hugging Face repo id")
    p.add_argument("--vae-preset", default=None, help="DMVAE preset for a reference vae.pt (e.g. dmvae-l)")
    p.add_argument("--vae-ema", action="store_true", help="load the EMA weights of a reference vae.pt")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids for the grid")
    p.add_argument("-o", "--out", default=None, help="output PNG grid")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ~sqrt)")
    p.add_argument("--num-per-class", type=int, default=None, help="images per class for --npz")
    p.add_argument("--num-classes", type=int, default=None, help="classes for --npz (default: the DiT's)")
    p.add_argument("--npz", default=None, help="output ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1 = none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for t in [LO, HI] (t=0 noise, t=1 data)")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first K channels (3 = the reference's legacy CFG)")
    p.add_argument("--steps", type=int, default=50, help="integration steps (reference points - 1)")
    p.add_argument("--method", default="euler", choices=["euler", "heun", "euler-maruyama", "dopri5"])
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the ODE grid")
    p.add_argument("--last-step-size", type=float, default=0.04, help="SDE final mean-step size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="sample and decode under bf16 autocast")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def _sampler_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(num_steps=args.steps, method=args.method, cfg_scale=args.cfg,
              cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
              guidance_channels=args.guidance_channels, time_shift=args.shift)
    if args.method == "euler-maruyama":
        kw["last_step_size"] = args.last_step_size
    return kw


def run(args: argparse.Namespace) -> int:
    import torch

    grid_mode, npz_mode = args.out is not None, args.npz is not None
    if grid_mode == npz_mode:
        raise ValueError("choose one output: -o GRID.png (with --classes) or --npz OUT.npz "
                         "(with --num-per-class)")
    if grid_mode and not args.classes:
        raise ValueError("-o needs --classes, e.g. --classes 207 360 387")
    if npz_mode and not args.num_per_class:
        raise ValueError("--npz needs --num-per-class N")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = f"cuda:{local_rank}" if world > 1 else "cuda"
    device = args.device or (cuda if torch.cuda.is_available() else "cpu")
    own_group = npz_mode and world > 1 and not torch.distributed.is_initialized()
    if own_group:  # torchrun: a process group only for the barrier before rank 0 merges the shards
        torch.distributed.init_process_group("gloo")
    try:
        return _run(args, device, rank, world, grid_mode)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, device: str, rank: int, world: int, grid_mode: bool) -> int:
    import torch

    from dmvae.autoencoder import DMVAE

    dit = _load_dit(args, device)
    vae = DMVAE.from_pretrained(args.vae, config=args.vae_preset, use_ema=args.vae_ema, device=device)
    amp = torch.bfloat16 if args.bf16 else None
    kw = _sampler_kwargs(args)

    if not grid_mode:
        from dmvae.generate import generate_npz

        out = generate_npz(dit, vae, args.npz, num_per_class=args.num_per_class,
                           num_classes=args.num_classes, batch_size=args.batch_size, seed=args.seed,
                           rank=rank, world_size=world, progress=True, device=device,
                           autocast_dtype=amp, **kw)
        summary = {"npz": str(out) if out else None, "rank": rank, "world_size": world, **_jsonable(kw)}
    else:
        from dmvae.generate import to_uint8
        from dmvae.samplers import sample

        labels = torch.tensor(args.classes, dtype=torch.long, device=device)
        c = dit.config
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(len(labels), c.in_channels, c.input_size, c.input_size, generator=g)
        amp_ctx = torch.autocast(torch.device(device).type, dtype=amp) if amp else nullcontext()
        with torch.no_grad(), amp_ctx:
            latents = sample(dit, noise.to(device), labels, generator=g if device == "cpu" else None,
                             progress=True, **kw)
            images = vae.decode(latents, normalize=True)
        _save_grid(to_uint8(images), Path(args.out), args.nrow)
        summary = {"grid": args.out, "classes": args.classes, **_jsonable(kw)}
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def _load_dit(args: argparse.Namespace, device: str):
    import sys

    from dmvae.dit import LatentDiT

    config = args.dit_config
    if config is not None and config.endswith(".json"):
        config = json.loads(Path(config).read_text())
    kw = dict(use_ema=not args.dit_raw, filename=args.dit_filename, device=device)
    if config is not None:
        return LatentDiT.from_pretrained(args.dit, config=config, **kw)
    try:
        return LatentDiT.from_pretrained(args.dit, **kw)
    except ValueError as e:
        if "config" not in str(e):
            raise
        print(f"note: {args.dit} has no config.json; using the release preset LightningDiT-XL/1 "
              "(pass --dit-config to choose another)", file=sys.stderr)
        return LatentDiT.from_pretrained(args.dit, config="LightningDiT-XL/1", **kw)


def _jsonable(kw: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def _save_grid(images, path: Path, nrow: int | None) -> None:
    """(B, H, W, 3) uint8 -> one PNG with a 2-px black border between tiles."""
    import math

    import numpy as np
    from PIL import Image

    b, h, w, _ = images.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    pad = 2
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y0:y0 + h, x0:x0 + w] = images[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
