"""Stage 1 (and stage 4): train the DMVAE tokenizer with L1 + LPIPS + adaptive PatchGAN (paper Eq. 10).

Stage 1 (tokenizer pre-training, paper App. B.1): the DINOv2 encoder is frozen, the MLP bottleneck
and the decoder learn. Stage 4 (decoder fine-tuning) is the same loop started from the stage-3
autoencoder with the bottleneck frozen too: ``--init runs/dmvae/vae --freeze-bottleneck``
(``examples/finetune_decoder.py`` sets these for you).

One explicit loop built from ``dmvae.training`` pieces. Each iteration:

    x_hat = vae(x);  rec = l1 |x_hat - x| + lpips LPIPS(x_hat, x)
    after --disc-start: g = -D(DiffAug(x_hat)); w = adaptive weight; loss = rec + 0.5 w g
    VAE step (grad clip 1, warm-up, EMA 0.9999); then the discriminator step
    (hinge on DiffAug(cat[x, x_hat]) + bCR)

CPU demo on scikit-image photos (a few minutes; LPIPS needs local VGG weights, see docs/training.md):

    python examples/train_tokenizer.py --out runs/tokenizer --steps 300 --lpips-weight 0

Resumes from ``<out>/checkpoints`` automatically; runs unchanged under
``torchrun --nproc_per_node=2 examples/train_tokenizer.py ...`` (gloo on CPU, nccl on GPU; the
global batch is ``--batch-size`` x processes). Real runs: ``--preset dmvae-l --image-size 256
--init-encoder --data /path/to/imagenet/train --batch-size 16 --lr 1e-4 --disc-start 5000
--warmup 1000 --lpips-weight 1``.

Writes ``<out>/vae`` and ``<out>/vae_ema`` (``DMVAE.from_pretrained`` directories whose config
carries the latent mean / scale measured on the training data) and ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dmvae.autoencoder import DMVAE, DMVAEConfig
from dmvae.training import (
    EMA,
    DiffAugment,
    LatentStats,
    NLayerDiscriminator,
    ReconstructionLoss,
    TrainImages,
    adaptive_generator_weight,
    all_reduce_gradients,
    all_reduce_mean,
    autocast,
    clip_grad_norm,
    discriminator_loss,
    gan_active,
    generator_loss,
    init_distributed,
    is_main_process,
    latest_checkpoint,
    linear_warmup,
    load_checkpoint,
    save_checkpoint,
)


def cpu_tiny_config(image_size: int) -> DMVAEConfig:
    """A DMVAE small enough to train on a laptop CPU: the ``dmvae-tiny`` preset (2-block 96-d
    ViT/16, z = 8) with a lighter 32-64 channel decoder."""
    return DMVAEConfig.from_preset("dmvae-tiny", image_size=image_size, decoder_channel_mult=(1, 1, 2, 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (checkpoints, final models, summary)")
    p.add_argument("--data", default="skimage", help="'skimage' (bundled photos) or an image folder")
    p.add_argument("--preset", default="cpu-tiny", help="'cpu-tiny' or a DMVAE preset (dmvae-l, dmvae-b)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--init", default=None, help="start from this DMVAE (from_pretrained source), e.g. stage 3")
    p.add_argument("--init-encoder", nargs="?", const="", default=None,
                   help="initialise the encoder from DINOv2 (optionally a local file / timm name)")
    p.add_argument("--train-encoder", action="store_true", help="do not freeze the encoder (stage 1 freezes it)")
    p.add_argument("--freeze-bottleneck", action="store_true", help="freeze the MLP bottleneck (stage 4)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--disc-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.005)
    p.add_argument("--disc-weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20, help="linear LR warm-up steps (reference 1000)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--l2-weight", type=float, default=0.0)
    p.add_argument("--lpips-weight", type=float, default=1.0)
    p.add_argument("--lpips-weights", default=None, help="LPIPS weights file / hf:// source (see dmvae.lpips)")
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--disc-start", type=int, default=100, help="GAN starts at this step (reference 5000)")
    p.add_argument("--disc-norm", default="batch", choices=["batch", "group", "none"])
    p.add_argument("--ndf", type=int, default=32, help="discriminator width (reference 64)")
    p.add_argument("--bcr-weight", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA only)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--stats-batches", type=int, default=8, help="batches for latent_mean / latent_scale")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_vae(args: argparse.Namespace) -> DMVAE:
    if args.init:
        vae = DMVAE.from_pretrained(args.init)
    else:
        cfg = cpu_tiny_config(args.image_size) if args.preset == "cpu-tiny" else DMVAEConfig.from_preset(
            args.preset, image_size=args.image_size)
        vae = DMVAE(cfg)
        if args.init_encoder is not None:
            vae.init_encoder_from_pretrained(args.init_encoder or None)
    vae.freeze_encoder(not args.train_encoder)
    vae.freeze_bottleneck(args.freeze_bottleneck)
    return vae


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    info = init_distributed()
    dev = info.device
    out = Path(args.out)
    torch.manual_seed(args.seed)  # same initial weights on every process
    vae = make_vae(args).to(dev)
    disc = NLayerDiscriminator(ndf=args.ndf, norm=args.disc_norm).to(dev)
    if info.world_size > 1 and args.disc_norm == "batch" and dev.type == "cuda":
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)  # the reference's SyncBN
    ema = EMA(vae, decay=args.ema_decay)
    betas = (0.9, 0.95)
    opt_vae = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=args.lr, betas=betas,
                                weight_decay=args.weight_decay)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=betas, weight_decay=args.disc_weight_decay)
    sched_vae, sched_disc = linear_warmup(opt_vae, args.warmup), linear_warmup(opt_disc, args.warmup)
    lpips = None
    if args.lpips_weight > 0:
        from dmvae.lpips import LPIPS

        lpips = LPIPS(weights=args.lpips_weights).to(dev)
    rec_loss = ReconstructionLoss(args.l1_weight, args.l2_weight, args.lpips_weight, lpips=lpips)
    augment = DiffAugment(translation=0.125, cutout=0.2)
    data = TrainImages(args.data, vae.config.image_size, seed=args.seed)

    ckpt_dir = out / "checkpoints"
    state = dict(vae=vae, ema=ema, disc=disc, opt_vae=opt_vae, opt_disc=opt_disc, sched_vae=sched_vae,
                 sched_disc=sched_disc)
    start = 0
    if latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, **state).step
        if is_main_process():
            print(f"resumed from step {start}")

    history: list[dict] = []
    t0 = time.time()
    for step in range(start, args.steps):
        x, _ = data.batch(step, args.batch_size, info.rank, info.world_size)
        x = x.to(dev)
        aug_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + info.rank)
        use_gan = gan_active(step, args.disc_start)

        # ---- autoencoder step
        vae.train()
        with autocast(dev, enabled=args.bf16 or None):
            x_hat = vae(x).reconstruction  # (B, 3, H, W) float32
            rec, parts = rec_loss(x_hat, x)
            loss, g_loss, w = rec, torch.zeros(()), torch.zeros(())
            if use_gan:
                disc.eval().requires_grad_(False)
                g_loss = generator_loss(disc(augment(x_hat, aug_gen)))
                w = adaptive_generator_weight(rec, g_loss, vae.decoder.conv_out.weight)
                loss = rec + args.disc_weight * w * g_loss
        opt_vae.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(vae)
        clip_grad_norm(vae, 1.0)
        opt_vae.step()
        sched_vae.step()
        ema.update()

        # ---- discriminator step (same iteration, on the detached reconstruction)
        d_loss = torch.zeros(())
        if use_gan:
            disc.train().requires_grad_(True)
            with autocast(dev, enabled=args.bf16 or None):
                d_loss, _ = discriminator_loss(disc, x, x_hat.detach(), augment, bcr_weight=args.bcr_weight,
                                               generator=aug_gen)
            opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            all_reduce_gradients(disc)
            clip_grad_norm(disc, 1.0)
            opt_disc.step()
            sched_disc.step()  # the discriminator's warm-up starts with its first step

        logged = all_reduce_mean(torch.stack([loss.detach().float(), parts.l1.float(), d_loss.detach().float()]))
        rec_psnr = -10 * math.log10(max(float(all_reduce_mean(((x_hat.detach() - x) / 2).pow(2).mean())), 1e-12))
        history.append({"step": step, "loss": logged[0].item(), "l1": logged[1].item(), "psnr": rec_psnr,
                        "d_loss": logged[2].item(), "gan_weight": float(w)})
        if is_main_process() and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:6d} loss {logged[0]:.4f} l1 {logged[1]:.4f} psnr {rec_psnr:.2f} "
                  f"d {logged[2]:.4f} w {float(w):.3g} lr {sched_vae.get_last_lr()[0]:.2e} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, keep_last=args.keep_last, **state)

    # ---- latent statistics of the EMA model on training crops, written into both configs
    stats = LatentStats()
    with torch.no_grad():
        for k in range(args.stats_batches):
            x, _ = data.batch(10**9 + k, args.batch_size, info.rank, info.world_size)
            stats.update(ema.module.encode(x.to(dev), normalize=False))
    mean, scale = stats.apply_to(ema.module)
    stats.apply_to(vae)
    summary = {"steps": args.steps, "start_step": start, "latent_mean": mean, "latent_scale": scale,
               "history": history}
    if is_main_process():
        vae.save_pretrained(out / "vae")
        ema.module.save_pretrained(out / "vae_ema")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return summary


if __name__ == "__main__":
    main()
