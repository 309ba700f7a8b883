"""Stage 1 (and stage 4): train the DMVAE tokenizer with L1 + LPIPS + adaptive PatchGAN (paper Eq. 10).

Stage 1 (tokenizer pre-training, paper App. B.1): the DINOv2 encoder is frozen, the MLP bottleneck
and the decoder learn. Stage 4 (decoder fine-tuning) is the same loop started from the stage-3
autoencoder with the bottleneck frozen too: ``--init runs/dmvae/vae --freeze-bottleneck``
(``examples/finetune_decoder.py`` sets these for you).

One explicit loop built from ``dmvae.training`` pieces. Each iteration:

    x_hat = vae(x);  rec = l1 |x_hat - x| + lpips LPIPS(x_hat, x)
    after --disc-start: g = -D(DiffAug(x_hat)); w = adaptive weight (global batch); loss = rec + 0.5 w g
    VAE step (grad clip 1, warm-up, EMA 0.9999 with warm-up); then the discriminator step
    (hinge on DiffAug(cat[x, x_hat]) + bCR)

At the end: the PSNR on held-out images (``--val-data``; with ``--data skimage``, bundled photos
the run never sees) of the initial, the raw and the EMA weights on one line, and a final preview
``<out>/images/final_<steps>.png`` (rows: originals, raw, EMA reconstructions).

CPU demo on scikit-image photos (a few minutes; LPIPS needs local VGG weights, see docs/training.md):

    python examples/train_tokenizer.py --out runs/tokenizer --steps 300 --lpips-weight 0

Data: a DataLoader over --data (class folders, flat folder, file list, tar shards) with a resumable
DistributedSampler. Resumes from ``<out>/checkpoints`` automatically, mid-epoch included. Under
``torchrun --nproc_per_node=N`` the VAE and the discriminator are wrapped in DistributedDataParallel
(gloo on CPU, nccl on GPU; the global batch is --batch-size x N). Real runs: ``--preset dmvae-l
--image-size 256 --init-encoder --data /path/to/imagenet/train --batch-size 16 --lr 1e-4 --disc-start
5000 --warmup 1000 --lpips-weight 1 --ndf 64 --num-workers 8 --bf16``.

Writes ``<out>/vae`` and ``<out>/vae_ema`` (``DMVAE.from_pretrained`` directories whose config
carries the latent mean / scale measured on the training data), ``<out>/metrics.jsonl`` and
``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from _train_utils import (
    adamw,
    add_data_args,
    add_ema_args,
    add_run_args,
    check_source,
    held_out,
    held_out_psnr,
    load_lpips,
    make_ema,
    make_loader,
    make_parser,
    maybe_compile,
    quality_line,
    resume_and_log,
    setup,
)

from dmvae.autoencoder import DMVAE, DMVAEConfig
from dmvae.dist import wrap_ddp
from dmvae.training import (
    DiffAugment,
    LatentStats,
    NLayerDiscriminator,
    ReconstructionLoss,
    adaptive_generator_weight,
    autocast,
    clip_grad_norm,
    discriminator_loss,
    gan_active,
    generator_loss,
    is_main_process,
    linear_warmup,
    save_checkpoint,
)
from dmvae.training.data import to_model_input
from dmvae.training.logger import RunningMeans


def cpu_tiny_config(image_size: int) -> DMVAEConfig:
    """A DMVAE small enough to train on a laptop CPU: the ``dmvae-tiny`` preset (2-block 96-d
    ViT/16, z = 8) with a lighter 32-64 channel decoder."""
    return DMVAEConfig.from_preset("dmvae-tiny", image_size=image_size, decoder_channel_mult=(1, 1, 2, 2))


def build_parser(prog: str | None = None, doc: str = __doc__) -> argparse.ArgumentParser:
    p = make_parser(doc, prog)
    p.add_argument("--out", required=True, help="run directory (checkpoints, final models, summary)")
    p.add_argument("--preset", default="cpu-tiny",
                   help="'cpu-tiny' (the dmvae-tiny preset with a lighter 32-64 channel decoder) or a DMVAE preset "
                        "(dmvae-tiny, dmvae-b, dmvae-l)")
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
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--l2-weight", type=float, default=0.0)
    p.add_argument("--lpips-weight", type=float, default=1.0, help="0 = no LPIPS (needs no VGG weights)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS weights file / hf:// source (see dmvae.lpips)")
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--disc-start", type=int, default=100, help="GAN starts at this step (reference 5000)")
    p.add_argument("--disc-norm", default="batch", choices=["batch", "group", "none"])
    p.add_argument("--ndf", type=int, default=32, help="discriminator width (reference 64)")
    p.add_argument("--bcr-weight", type=float, default=1.0)
    p.add_argument("--no-diffaug", dest="diffaug", action="store_false",
                   help="no DiffAugment in the GAN terms (then also --bcr-weight 0)")
    p.add_argument("--stats-batches", type=int, default=8, help="batches for latent_mean / latent_scale")
    add_ema_args(p)
    add_data_args(p)
    add_run_args(p, log_every=10, image_every=0)
    return p


def make_vae(args: argparse.Namespace) -> DMVAE:
    if args.init:
        check_source("--init", args.init)
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


def main(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> dict:
    args = build_parser(prog, doc or __doc__).parse_args(argv)
    stage = "stage 4 (decoder fine-tune)" if args.freeze_bottleneck else "stage 1 (tokenizer)"
    info = setup(args)
    dev = info.device
    out = Path(args.out)
    torch.manual_seed(args.seed)  # same initial weights on every process
    vae = make_vae(args).to(dev)
    loader = make_loader(args, vae.config.image_size, args.batch_size)
    disc = NLayerDiscriminator(ndf=args.ndf, norm=args.disc_norm).to(dev)
    if info.world_size > 1 and args.disc_norm == "batch" and dev.type == "cuda":
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)  # the reference's SyncBN
    ema = make_ema(vae, args)
    betas = (0.9, 0.95)
    opt_vae = adamw(vae.parameters(), dev, lr=args.lr, betas=betas, weight_decay=args.weight_decay)
    opt_disc = adamw(disc.parameters(), dev, lr=args.disc_lr, betas=betas, weight_decay=args.disc_weight_decay)
    sched_vae, sched_disc = linear_warmup(opt_vae, args.warmup), linear_warmup(opt_disc, args.warmup)
    rec_loss = ReconstructionLoss(args.l1_weight, args.l2_weight, args.lpips_weight, lpips=load_lpips(args, dev))
    augment = DiffAugment(translation=0.125, cutout=0.2) if args.diffaug else None
    # DDP synchronises the trainable parameters; the frozen critic passes use the plain modules
    vae_ddp = wrap_ddp(maybe_compile(vae, args.compile), dev)
    disc_ddp = wrap_ddp(maybe_compile(disc, args.compile), dev)
    last_layer = vae.decoder.conv_out.weight  # for the adaptive GAN weight (unwrapped parameter)

    ckpt_dir = out / "checkpoints"
    state = dict(vae=vae, ema=ema, disc=disc, opt_vae=opt_vae, opt_disc=opt_disc, sched_vae=sched_vae,
                 sched_disc=sched_disc, data=loader)
    start, log = resume_and_log(args, out, state, desc=stage)
    x_val, _, val_what = held_out(args, vae.config.image_size, dev)
    initial_psnr = held_out_psnr(vae, x_val)[0] if start == 0 else None  # the weights every model starts from
    means = RunningMeans()
    history: list[dict] = []
    for step in range(start, args.steps):
        images, _ = next(loader)
        x = to_model_input(images, dev)
        aug_gen = torch.Generator(dev).manual_seed(args.seed * 1_000_003 + step * 101 + info.rank)
        use_gan = gan_active(step, args.disc_start)

        # ---- autoencoder step
        vae.train()
        with autocast(dev, enabled=args.bf16 or None):
            x_hat = vae_ddp(x).reconstruction  # (B, 3, H, W) float32
            rec, parts = rec_loss(x_hat, x)
            loss = rec
            if use_gan:
                disc.eval().requires_grad_(False)
                x_gen = augment(x_hat, aug_gen) if augment is not None else x_hat
                g_loss = generator_loss(disc(x_gen))
                w = adaptive_generator_weight(rec, g_loss, last_layer)  # averaged over processes
                loss = rec + args.disc_weight * w * g_loss
                means.add(g_loss=g_loss, gan_weight=w)
        opt_vae.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(vae, 1.0)
        opt_vae.step()
        sched_vae.step()
        ema.update()

        # ---- discriminator step (same iteration, on the detached reconstruction)
        if use_gan:
            disc.train().requires_grad_(True)
            with autocast(dev, enabled=args.bf16 or None):
                d_loss, _ = discriminator_loss(disc_ddp, x, x_hat.detach(), augment, bcr_weight=args.bcr_weight,
                                               generator=aug_gen)
            opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            clip_grad_norm(disc, 1.0)
            opt_disc.step()
            sched_disc.step()  # the discriminator's warm-up starts with its first step
            means.add(d_loss=d_loss)

        means.add(loss=loss, l1=parts.l1, mse=((x_hat.detach().float() - x) / 2).pow(2).mean())
        if args.lpips_weight > 0:
            means.add(lpips=parts.lpips)
        log.advance()
        if log.is_log_step(step):
            m = means.pop()
            m["psnr"] = -10 * math.log10(max(m.pop("mse"), 1e-12))
            history.append(log.log(step, m, lr=sched_vae.get_last_lr()[0]))
        if args.image_every and step % args.image_every == 0:
            log.images(step, "reconstruction", torch.cat([x[:8], x_hat.detach()[:8]]), nrow=min(8, x.shape[0]))
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, keep_last=args.keep_last, **state)

    # ---- end of the stage: held-out PSNR of raw and EMA weights, final preview
    raw_psnr, raw_rec = held_out_psnr(vae, x_val)
    ema_psnr, ema_rec = held_out_psnr(ema.module, x_val)
    quality = {"metric": "psnr_db", "data": val_what, "initial": initial_psnr, "raw": raw_psnr, "ema": ema_psnr}
    n = min(8, x_val.shape[0])
    if is_main_process():
        log.images(args.steps, "final", torch.cat([x_val[:n], raw_rec[:n], ema_rec[:n]]), nrow=n)
    log.close()
    quality_line(stage, val_what, "PSNR", {"initial": initial_psnr, "raw": raw_psnr, "EMA": ema_psnr}, " dB")

    # ---- latent statistics of the EMA model on centre crops, written into both configs
    stats = LatentStats()
    stats_loader = make_loader(args, vae.config.image_size, args.batch_size, center_crop=True)
    with torch.no_grad():
        for _ in range(min(args.stats_batches, stats_loader.steps_per_epoch)):
            images, _ = next(stats_loader)
            stats.update(ema.module.encode(to_model_input(images, dev), normalize=False))
    mean, scale = stats.apply_to(ema.module)
    stats.apply_to(vae)
    summary = {"steps": args.steps, "start_step": start, "latent_mean": mean, "latent_scale": scale,
               "quality": quality, "history": history}
    if is_main_process():
        vae.save_pretrained(out / "vae")
        ema.module.save_pretrained(out / "vae_ema")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return summary


if __name__ == "__main__":
    main()
