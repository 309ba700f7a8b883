"""Stage 3: distribution-matching training of the autoencoder (paper Sec. 3, App. B.3; reference ``train_dmd.py``).

Two-time-scale loop built from library parts:

    every step:        lat = normalise(vae.encode(x))
                       fake model: flow matching on lat.detach()                       (paper Eq. 7)
    every k-th step:   VAE: rec (L1 + LPIPS) + GAN (after --disc-start) + dm_weight * L_DM(lat)
                       (L_DM pulls q(z) towards the real/reference model, Eq. 8), then the
                       discriminator

The real model is frozen: a LatentDiT from stage 2 (``--real runs/reference/dit_ema``; the fake
model starts as a copy of it, as in the paper) or a built-in prior (``--real prior:gaussian`` /
``prior:gmm``; the fake model then starts from ``--fake-init``, e.g. the stage-2 DiT, which models
the current q(z)). ``--dm-weight 0`` gives the same loop without the DM term (the baseline of
``benchmarks/dm_experiment.py``).

CPU demo (after stages 1 and 2):

    python examples/train_dmvae.py --vae runs/tokenizer/vae_ema --real runs/reference/dit_ema \
        --out runs/dmvae --steps 200 --lpips-weight 0

The reference trains the whole VAE, DINOv2 encoder included (``--freeze-encoder`` to keep it
fixed), at lr 2e-5 with dm_weight 10, CFG 5 inside the DM loss and k = 5, without an EMA. Resumes
from ``<out>/checkpoints``; runs unchanged under ``torchrun --nproc_per_node=2``. Writes
``<out>/vae``, ``<out>/fake`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dmvae.autoencoder import DMVAE
from dmvae.dit import LatentDiT
from dmvae.dm_loss import DistributionMatchingLoss
from dmvae.training import (
    DiffAugment,
    NLayerDiscriminator,
    ReconstructionLoss,
    TrainImages,
    TwoTimeScaleSchedule,
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="stage-1 DMVAE (from_pretrained source)")
    p.add_argument("--real", required=True, help="frozen real model: a LatentDiT source or 'prior:<name>'")
    p.add_argument("--fake-init", default=None, help="LatentDiT to start the fake model from (default: --real)")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="skimage")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--lr", type=float, default=2e-4, help="VAE lr (reference 2e-5)")
    p.add_argument("--fake-lr", type=float, default=2e-4, help="fake-model lr (reference 2e-5)")
    p.add_argument("--disc-lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.005)
    p.add_argument("--disc-weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20, help="reference 1000")
    p.add_argument("--vae-every", type=int, default=5, help="autoencoder update every k steps")
    p.add_argument("--dm-weight", type=float, default=10.0)
    p.add_argument("--dm-cfg", type=float, default=5.0, help="CFG scale on both scores in L_DM (1 = off)")
    p.add_argument("--freeze-encoder", action="store_true", help="keep the ViT encoder fixed")
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--lpips-weight", type=float, default=1.0)
    p.add_argument("--lpips-weights", default=None)
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--disc-start", type=int, default=100)
    p.add_argument("--disc-norm", default="batch", choices=["batch", "group", "none"])
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--bcr-weight", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p


def make_real(spec: str, vae: DMVAE) -> torch.nn.Module:
    if spec.startswith("prior:"):
        from dmvae.priors import create_prior

        return create_prior(spec[len("prior:"):], shape=vae.latent_shape())
    return LatentDiT.from_pretrained(spec)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    info = init_distributed()
    dev = info.device
    out = Path(args.out)
    torch.manual_seed(args.seed)
    vae = DMVAE.from_pretrained(args.vae).to(dev)
    vae.requires_grad_(True).freeze_encoder(args.freeze_encoder)
    real = make_real(args.real, vae).to(dev).eval().requires_grad_(False)
    fake_src = args.fake_init or (None if args.real.startswith("prior:") else args.real)
    if fake_src is None:
        raise SystemExit("--real is a prior: pass --fake-init <LatentDiT> (e.g. the stage-2 model)")
    fake = LatentDiT.from_pretrained(fake_src).to(dev)
    dm = DistributionMatchingLoss(real, fake, cfg_scale=args.dm_cfg)
    disc = NLayerDiscriminator(ndf=args.ndf, norm=args.disc_norm).to(dev)
    betas = (0.9, 0.95)
    opt_vae = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=args.lr, betas=betas,
                                weight_decay=args.weight_decay)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=args.fake_lr, betas=betas, weight_decay=args.weight_decay)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=betas, weight_decay=args.disc_weight_decay)
    sched_vae, sched_fake, sched_disc = (linear_warmup(o, args.warmup) for o in (opt_vae, opt_fake, opt_disc))
    lpips = None
    if args.lpips_weight > 0:
        from dmvae.lpips import LPIPS

        lpips = LPIPS(weights=args.lpips_weights).to(dev)
    rec_loss = ReconstructionLoss(args.l1_weight, 0.0, args.lpips_weight, lpips=lpips)
    augment = DiffAugment(translation=0.125, cutout=0.2)
    schedule = TwoTimeScaleSchedule(autoencoder_every=args.vae_every)
    data = TrainImages(args.data, vae.config.image_size, seed=args.seed)

    ckpt_dir = out / "checkpoints"
    state = dict(vae=vae, fake=fake, disc=disc, dm=dm, opt_vae=opt_vae, opt_fake=opt_fake, opt_disc=opt_disc,
                 sched_vae=sched_vae, sched_fake=sched_fake, sched_disc=sched_disc)
    start = 0
    if latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, **state).step
        if is_main_process():
            print(f"resumed from step {start}")

    history: list[dict] = []
    t0 = time.time()
    for step in range(start, args.steps):
        x, y = data.batch(step, args.batch_size, info.rank, info.world_size)
        x, y = x.to(dev), y.to(dev)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + info.rank)
        rec_v = dm_v = d_v = float("nan")
        psnr = float("nan")

        if schedule.autoencoder_step(step):
            # ---- autoencoder turn: the fake model is a frozen critic here
            fake.eval().requires_grad_(False)
            vae.train()
            use_gan = gan_active(step, args.disc_start)
            with autocast(dev, enabled=args.bf16 or None):
                o = vae(x)
                lat = o.normalized_latents  # (B, z, h, w), carries the encoder's graph
                rec, _ = rec_loss(o.reconstruction, x)
                dm_val, _ = dm(lat, y, generator=gen)
                loss = rec + args.dm_weight * dm_val
                if use_gan:
                    disc.eval().requires_grad_(False)
                    g_loss = generator_loss(disc(augment(o.reconstruction, gen)))
                    w = adaptive_generator_weight(rec, g_loss, vae.decoder.conv_out.weight)
                    loss = loss + args.disc_weight * w * g_loss
            opt_vae.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_gradients(vae)
            clip_grad_norm(vae, 1.0)
            opt_vae.step()
            sched_vae.step()
            if use_gan:
                disc.train().requires_grad_(True)
                d_loss, _ = discriminator_loss(disc, x, o.reconstruction.detach(), augment,
                                               bcr_weight=args.bcr_weight, generator=gen)
                opt_disc.zero_grad(set_to_none=True)
                d_loss.backward()
                all_reduce_gradients(disc)
                clip_grad_norm(disc, 1.0)
                opt_disc.step()
                sched_disc.step()
                d_v = all_reduce_mean(d_loss.detach().float()).item()
            fake.requires_grad_(True)
            rec_v = all_reduce_mean(rec.detach().float()).item()
            dm_v = all_reduce_mean(dm_val.detach().float()).item()
            mse = all_reduce_mean(((o.reconstruction.detach() - x) / 2).pow(2).mean()).item()
            psnr = -10 * math.log10(max(mse, 1e-12))
            lat = lat.detach()
        else:
            with torch.no_grad():
                lat = vae.encode(x)  # normalised latents of the current autoencoder

        # ---- fake model: every step, flow matching on the detached latents
        fake.train()
        with autocast(dev, enabled=args.bf16 or None):
            f_loss, _ = dm.fake_loss(lat, y, generator=gen)
        opt_fake.zero_grad(set_to_none=True)
        f_loss.backward()
        all_reduce_gradients(fake)
        clip_grad_norm(fake, 1.0)
        opt_fake.step()
        sched_fake.step()

        f_v = all_reduce_mean(f_loss.detach().float()).item()
        rec_ = {"fake_loss": f_v, "rec": rec_v, "dm": dm_v, "d_loss": d_v, "psnr": psnr}
        history.append({"step": step, **{k: (None if math.isnan(v) else v) for k, v in rec_.items()}})
        if is_main_process() and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:6d} fake {f_v:.4f} rec {rec_v:.4f} dm {dm_v:.4f} psnr {psnr:.2f} d {d_v:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, keep_last=args.keep_last, **state)

    summary = {"steps": args.steps, "start_step": start, "history": history}
    if is_main_process():
        vae.save_pretrained(out / "vae")  # latent statistics unchanged (the reference keeps stage 1's)
        fake.save_pretrained(out / "fake")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
