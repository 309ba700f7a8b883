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
Writes ``<out>/vae``, ``<out>/fake``, ``<out>/metrics.jsonl`` and ``summary.json``. Every
``--health-every`` steps and at the end, the DM-health figures (``dmvae.DMHealth``: the fake's
over-fit gap, the floor of the DM update, latent drift; docs/training.md, "Is my DM stage
healthy?") go to ``metrics.jsonl`` as ``health/...`` lines, with a printed warning when one is off.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from _train_utils import (_is_shards, add_data_args, add_run_args, adamw, check_source, fail, held_out, held_out_psnr,
                          load_lpips, make_loader, make_parser, maybe_compile, quality_line, resume_and_log, setup)
from dmvae._utils import eval_mode
from dmvae.autoencoder import DMVAE
from dmvae.dit import LatentDiT
from dmvae.dm_health import DMHealth
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
    add_health_args(p)
    return p


def add_health_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DM health (dmvae.dm_health; see docs/training.md, 'Is my DM stage healthy?')")
    g.add_argument("--health-every", type=int, default=50,
                   help="steps between DM-health lines in metrics.jsonl (0 = only the end-of-stage line)")
    g.add_argument("--health-floor", default="auto", choices=["auto", "on", "off"],
                   help="measure the floor (DM update on stage-1 latents, which should be ~0 while the fake "
                        "equals the teacher); auto = on when --real is a LatentDiT and the fake starts as it")


class StageHealth:
    """The DM-health monitor of this run: the held-out images (``--val-data``, as the end-of-stage
    PSNR) and as many fixed training images (centre crops), encoded now by the current autoencoder
    against their stage-1 latents (encoded at construction, before any checkpoint is restored)."""

    def __init__(self, args: argparse.Namespace, vae: DMVAE, dm: DistributionMatchingLoss,
                 dev: torch.device) -> None:
        from dmvae.training.data import build_dataset, center_crop_transform

        self.vae, self.bf16 = vae, bool(args.bf16)
        self.x, self.y, self.what = held_out(args, vae.config.image_size, dev)
        self.x_train = self.y_train = None
        if not _is_shards(args.data):  # tar shards: no fixed training images, no over-fit gap
            train = build_dataset(args.data, center_crop_transform(vae.config.image_size))
            n = min(self.x.shape[0], len(train))
            if n >= 2:
                items = [train[i * len(train) // n] for i in range(n)]
                self.x_train = to_model_input(torch.stack([im for im, _ in items]), dev)
                self.y_train = torch.tensor([lab for _, lab in items], dtype=torch.long, device=dev)
        floor = {"on": True, "off": False}.get(args.health_floor,
                                                not args.real.startswith("prior:") and args.fake_init is None)
        self.monitor = DMHealth(dm, stage1=self.encode(self.x), labels=self.y, fake_matches_teacher=floor,
                                stage1_train=None if self.x_train is None else self.encode(self.x_train),
                                train_labels=self.y_train, seed=args.seed)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.vae):
            return self.vae.encode(x, autocast=self.bf16).float()  # normalised latents

    def measure(self) -> dict[str, float]:
        train = None if self.x_train is None else self.encode(self.x_train)
        return self.monitor.measure(self.encode(self.x), train)


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
    health = StageHealth(args, vae, dm, dev) if is_main_process() else None  # stage-1 latents: before resuming
    health_log: list[dict] = []
    start, log = resume_and_log(args, out, state, desc="stage 3")
    x_val, _, val_what = held_out(args, vae.config.image_size, dev)
    initial_psnr = held_out_psnr(vae, x_val)[0] if start == 0 else None
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
        if health is not None and args.health_every and (step + 1) % args.health_every == 0 and step + 1 < args.steps:
            figures = health.measure()  # its own metrics.jsonl line (the history keeps the training means)
            health_log.append(log.log(step, figures))
            for w in health.monitor.warnings(figures):
                print(f"step {step}: {w}", flush=True)
        if args.image_every and step % args.image_every == 0 and schedule.autoencoder_step(step):
            log.images(step, "reconstruction", torch.cat([x[:8], o.reconstruction.detach()[:8]]),
                       nrow=min(8, x.shape[0]))
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, keep_last=args.keep_last, **state)

    # ---- end of the stage: held-out PSNR (no EMA in stage 3, as the reference) and a final preview;
    # the DM health figures (dmvae.dm_health) belong on this line too
    raw_psnr, raw_rec = held_out_psnr(vae, x_val)
    quality = {"metric": "psnr_db", "data": val_what, "initial": initial_psnr, "raw": raw_psnr}
    if is_main_process():
        n = min(8, x_val.shape[0])
        log.images(args.steps, "final", torch.cat([x_val[:n], raw_rec[:n]]), nrow=n)
    health_end: dict = {}
    if health is not None:  # the end-of-stage DM-health line (metrics.jsonl, and printed below)
        figures = health.measure()
        health_end = {"figures": log.log(max(args.steps - 1, 0), figures), "warnings": health.monitor.warnings(figures),
                      "notes": health.monitor.notes, "history": health_log}
    log.close()
    quality_line("stage 3 (DM)", val_what, "PSNR", {"initial": initial_psnr, "raw": raw_psnr}, " dB")

    if health is not None:
        print(f"stage 3 (DM) | {health.what} | {health.monitor.report(figures)}", flush=True)
        for w in health_end["warnings"]:
            print(w, flush=True)
        for note in health.monitor.notes:
            print(f"DM health note: {note}", flush=True)

    summary = {"steps": args.steps, "start_step": start, "quality": quality, "history": history}
    if health_end:
        summary["health"] = health_end
    if is_main_process():
        vae.save_pretrained(out / "vae")  # latent statistics unchanged (the reference keeps stage 1's)
        fake.save_pretrained(out / "fake")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
