r"""Stage 3: distribution-matching training of the autoencoder (paper Sec. 3, App. B.3; reference ``train_dmd.py``).

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
from ``<out>/checkpoints`` (mid-epoch included). Under ``torchrun --nproc_per_node=N`` the VAE, the
fake model and the discriminator are each wrapped in DistributedDataParallel; the frozen-critic
passes (the fake model inside L_DM, the discriminator inside the generator loss) use the plain
modules, and the adaptive GAN weight uses the gradients of the global batch. Noise and times are
drawn for the global batch, so N processes compute what one process with N x the batch computes.
Writes ``<out>/vae``, ``<out>/fake``, ``<out>/metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from _train_utils import (add_data_args, add_run_args, adamw, check_source, fail, load_lpips, make_loader,
                          make_parser, maybe_compile, resume_and_log, setup)
from dmvae.autoencoder import DMVAE
from dmvae.dit import LatentDiT
from dmvae.dm_loss import DistributionMatchingLoss
from dmvae.training import (
    DiffAugment,
    NLayerDiscriminator,
    ReconstructionLoss,
    TwoTimeScaleSchedule,
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
from dmvae.dist import GlobalBatchRandom, wrap_ddp
from dmvae.training.logger import RunningMeans
from dmvae.transport import FlowMatching


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--vae", required=True, help="stage-1 DMVAE (from_pretrained source)")
    p.add_argument("--real", required=True, help="frozen real model: a LatentDiT source or 'prior:<name>'")
    p.add_argument("--fake-init", default=None, help="LatentDiT to start the fake model from (default: --real)")
    p.add_argument("--out", required=True)
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
    p.add_argument("--lpips-weight", type=float, default=1.0, help="0 = no LPIPS (needs no VGG weights)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS weights file / hf:// source (see dmvae.lpips)")
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--disc-start", type=int, default=100)
    p.add_argument("--disc-norm", default="batch", choices=["batch", "group", "none"])
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--bcr-weight", type=float, default=1.0)
    p.add_argument("--no-diffaug", dest="diffaug", action="store_false",
                   help="no DiffAugment in the GAN terms (then also --bcr-weight 0)")
    add_data_args(p)
    add_run_args(p, log_every=10, image_every=0)
    return p


def make_real(spec: str, vae: DMVAE) -> torch.nn.Module:
    if spec.startswith("prior:"):
        from dmvae.priors import create_prior

        return create_prior(spec[len("prior:"):], shape=vae.latent_shape())
    return LatentDiT.from_pretrained(spec)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    info = setup(args)
    dev = info.device
    out = Path(args.out)
    for flag in ("vae", "real", "fake_init"):
        if getattr(args, flag):
            check_source("--" + flag.replace("_", "-"), getattr(args, flag))
    fake_src = args.fake_init or (None if args.real.startswith("prior:") else args.real)
    if fake_src is None:
        raise fail("--real is a prior: pass --fake-init <LatentDiT> (e.g. the stage-2 model)")
    torch.manual_seed(args.seed)
    vae = DMVAE.from_pretrained(args.vae).to(dev)
    vae.requires_grad_(True).freeze_encoder(args.freeze_encoder)
    real = make_real(args.real, vae).to(dev).eval().requires_grad_(False)
    fake = LatentDiT.from_pretrained(fake_src).to(dev)
    dm = DistributionMatchingLoss(real, fake, cfg_scale=args.dm_cfg)  # the plain fake: a frozen critic here
    fm = FlowMatching()  # the fake model's objective (Eq. 7): x_t = t z + (1 - t) eps, target z - eps
    disc = NLayerDiscriminator(ndf=args.ndf, norm=args.disc_norm).to(dev)
    if info.world_size > 1 and args.disc_norm == "batch" and dev.type == "cuda":
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    betas = (0.9, 0.95)
    opt_vae = adamw(vae.parameters(), dev, lr=args.lr, betas=betas, weight_decay=args.weight_decay)
    opt_fake = adamw(fake.parameters(), dev, lr=args.fake_lr, betas=betas, weight_decay=args.weight_decay)
    opt_disc = adamw(disc.parameters(), dev, lr=args.disc_lr, betas=betas, weight_decay=args.disc_weight_decay)
    sched_vae, sched_fake, sched_disc = (linear_warmup(o, args.warmup) for o in (opt_vae, opt_fake, opt_disc))
    rec_loss = ReconstructionLoss(args.l1_weight, 0.0, args.lpips_weight, lpips=load_lpips(args, dev))
    augment = DiffAugment(translation=0.125, cutout=0.2) if args.diffaug else None
    schedule = TwoTimeScaleSchedule(autoencoder_every=args.vae_every)
    loader = make_loader(args, vae.config.image_size, args.batch_size)
    vae_ddp = wrap_ddp(maybe_compile(vae, args.compile), dev)
    fake_ddp = wrap_ddp(maybe_compile(fake, args.compile), dev)
    disc_ddp = wrap_ddp(disc, dev)
    drop_p = fake.config.class_dropout_prob

    ckpt_dir = out / "checkpoints"
    state = dict(vae=vae, fake=fake, disc=disc, dm=dm, opt_vae=opt_vae, opt_fake=opt_fake, opt_disc=opt_disc,
                 sched_vae=sched_vae, sched_fake=sched_fake, sched_disc=sched_disc, data=loader)
    start, log = resume_and_log(args, out, state, desc="stage 3")
    means = RunningMeans()
    history: list[dict] = []
    for step in range(start, args.steps):
        images, y = next(loader)
        x, y = to_model_input(images, dev), y.to(dev, non_blocking=True)
        rnd = GlobalBatchRandom(args.seed, step, x.shape[0], device=dev)  # same numbers for any world size
        gen = torch.Generator(dev).manual_seed(args.seed * 1_000_003 + step * 101 + info.rank)  # DiffAugment

        if schedule.autoencoder_step(step):
            # ---- autoencoder turn: the fake model is a frozen critic here
            fake.eval().requires_grad_(False)
            vae.train()
            use_gan = gan_active(step, args.disc_start)
            with autocast(dev, enabled=args.bf16 or None):
                o = vae_ddp(x)
                lat = o.normalized_latents  # (B, z, h, w), carries the encoder's graph
                rec, _ = rec_loss(o.reconstruction, x)
                t0, t1 = dm.current_t_range()
                dm_val, _ = dm(lat, y, t=t0 + (t1 - t0) * rnd.rand(), noise=rnd.randn(*lat.shape[1:]))
                loss = rec + args.dm_weight * dm_val
                if use_gan:
                    disc.eval().requires_grad_(False)
                    x_gen = augment(o.reconstruction, gen) if augment is not None else o.reconstruction
                    g_loss = generator_loss(disc(x_gen))
                    w = adaptive_generator_weight(rec, g_loss, vae.decoder.conv_out.weight)  # global batch
                    loss = loss + args.disc_weight * w * g_loss
                    means.add(g_loss=g_loss, gan_weight=w)
            opt_vae.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(vae, 1.0)
            opt_vae.step()
            sched_vae.step()
            if use_gan:
                disc.train().requires_grad_(True)
                with autocast(dev, enabled=args.bf16 or None):
                    d_loss, _ = discriminator_loss(disc_ddp, x, o.reconstruction.detach(), augment,
                                                   bcr_weight=args.bcr_weight, generator=gen)
                opt_disc.zero_grad(set_to_none=True)
                d_loss.backward()
                clip_grad_norm(disc, 1.0)
                opt_disc.step()
                sched_disc.step()
                means.add(d_loss=d_loss)
            fake.requires_grad_(True)
            means.add(rec=rec, dm=dm_val, mse=((o.reconstruction.detach().float() - x) / 2).pow(2).mean())
            lat = lat.detach()
        else:
            with torch.no_grad():
                lat = vae.encode(x, autocast=bool(args.bf16))  # normalised latents of the current autoencoder

        # ---- fake model: every step, flow matching on the detached latents (through DDP)
        fake.train()
        t, noise = rnd.rand(), rnd.randn(*lat.shape[1:])
        drop = {"force_drop_ids": rnd.bernoulli(drop_p)} if drop_p > 0 else {}  # label dropout, global draw
        with autocast(dev, enabled=args.bf16 or None):
            f_loss = fm.loss(fake_ddp, lat.float(), y, t=t, noise=noise, **drop).loss
        opt_fake.zero_grad(set_to_none=True)
        f_loss.backward()
        clip_grad_norm(fake, 1.0)
        opt_fake.step()
        sched_fake.step()
        means.add(fake_loss=f_loss)

        log.advance()
        if log.is_log_step(step):
            m = means.pop()
            if "mse" in m:
                m["psnr"] = -10 * math.log10(max(m.pop("mse"), 1e-12))
            history.append(log.log(step, m, lr=sched_vae.get_last_lr()[0]))
        if args.image_every and step % args.image_every == 0 and schedule.autoencoder_step(step):
            log.images(step, "reconstruction", torch.cat([x[:8], o.reconstruction.detach()[:8]]),
                       nrow=min(8, x.shape[0]))
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, keep_last=args.keep_last, **state)
    log.close()

    summary = {"steps": args.steps, "start_step": start, "history": history}
    if is_main_process():
        vae.save_pretrained(out / "vae")  # latent statistics unchanged (the reference keeps stage 1's)
        fake.save_pretrained(out / "fake")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
