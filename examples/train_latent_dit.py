"""Stage 2 / stage 5: train a LatentDiT (flow matching, velocity target) on a frozen DMVAE's latents.

Stage 2 (reference modelling, reference ``train_diffusion.py``) fits the "real" score model on the
stage-1 tokenizer's latents; stage 5 trains the downstream generator on the final (stage-4)
autoencoder's latents. Same loop, different ``--vae``:

    z = vae.encode(x)                      # normalised with the VAE config's latent_mean / scale
    loss = E_t,eps |dit(t z + (1 - t) eps, t, y) - (z - eps)|^2
    AdamW (0.9, 0.95), wd 0, grad clip 1, constant LR, EMA 0.9999

CPU demo (after examples/train_tokenizer.py):

    python examples/train_latent_dit.py --vae runs/tokenizer/vae_ema --out runs/reference --steps 300

Resumes from ``<out>/checkpoints``; runs unchanged under ``torchrun --nproc_per_node=2``. Writes
``<out>/dit`` and ``<out>/dit_ema`` (``LatentDiT.from_pretrained`` directories) and ``summary.json``.
Real runs: ``--preset LightningDiT-XL/1 --lr 2e-4 --batch-size 64 --data /path/to/imagenet/train``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dmvae.autoencoder import DMVAE
from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.training import (
    EMA,
    TrainImages,
    all_reduce_gradients,
    all_reduce_mean,
    autocast,
    clip_grad_norm,
    init_distributed,
    is_main_process,
    latest_checkpoint,
    linear_warmup,
    load_checkpoint,
    save_checkpoint,
)
from dmvae.transport import FlowMatching


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="frozen DMVAE (from_pretrained source), e.g. runs/tokenizer/vae_ema")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="skimage", help="'skimage' or an image folder (class sub-folders = labels)")
    p.add_argument("--preset", default="cpu-tiny", help="'cpu-tiny' or a LatentDiT preset (LightningDiT-XL/1, ...)")
    p.add_argument("--init", default=None, help="start from this LatentDiT (from_pretrained source)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="reference 2e-4")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="0 = constant LR (the reference)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout (gives the CFG null class)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return p


def make_dit(args: argparse.Namespace, vae: DMVAE, num_classes: int) -> LatentDiT:
    if args.init:
        return LatentDiT.from_pretrained(args.init)
    z, h, _ = vae.latent_shape()
    common = dict(input_size=h, in_channels=z, num_classes=num_classes, class_dropout_prob=args.class_dropout)
    if args.preset == "cpu-tiny":
        return LatentDiT(LatentDiTConfig(patch_size=1, hidden_size=64, depth=2, num_heads=2, **common))
    return LatentDiT(LatentDiTConfig.from_preset(args.preset, **common))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    info = init_distributed()
    dev = info.device
    out = Path(args.out)
    vae = DMVAE.from_pretrained(args.vae).to(dev).eval().requires_grad_(False)
    if (vae.config.latent_mean, vae.config.latent_scale) == (0.0, 1.0) and is_main_process():
        print("warning: the VAE config has identity latent statistics (latent_mean 0, latent_scale 1); "
              "set them with dmvae.training.LatentStats(...).apply_to(vae) first")
    data = TrainImages(args.data, vae.config.image_size, seed=args.seed)
    torch.manual_seed(args.seed)
    dit = make_dit(args, vae, data.num_classes).to(dev)
    ema = EMA(dit, decay=args.ema_decay)
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sched = linear_warmup(opt, args.warmup)
    fm = FlowMatching()  # uniform t, linear path, velocity target (the reference)

    ckpt_dir = out / "checkpoints"
    state = dict(dit=dit, ema=ema, opt=opt, sched=sched)
    start = 0
    if latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, **state).step
        if is_main_process():
            print(f"resumed from step {start}")

    history: list[dict] = []
    t0 = time.time()
    for step in range(start, args.steps):
        x, y = data.batch(step, args.batch_size, info.rank, info.world_size)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + info.rank)
        with torch.no_grad():
            z = vae.encode(x.to(dev), autocast=args.bf16)  # (B, z, h, w), normalised
        dit.train()  # label dropout on (global RNG, restored on resume)
        with autocast(dev, enabled=args.bf16 or None):
            loss = fm.loss(dit, z, y.to(dev), generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(dit)
        clip_grad_norm(dit, 1.0)
        opt.step()
        sched.step()
        ema.update()
        logged = all_reduce_mean(loss.detach().float()).item()
        history.append({"step": step, "loss": logged})
        if is_main_process() and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:6d} fm loss {logged:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, keep_last=args.keep_last, **state)

    summary = {"steps": args.steps, "start_step": start, "history": history}
    if is_main_process():
        dit.save_pretrained(out / "dit")
        ema.module.save_pretrained(out / "dit_ema")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
