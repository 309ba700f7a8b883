"""Stage 2 / stage 5: train a LatentDiT (flow matching, velocity target) on a frozen DMVAE's latents.

Stage 2 (reference modelling, reference ``train_diffusion.py``) fits the "real" score model on the
stage-1 tokenizer's latents; stage 5 trains the downstream generator on the final (stage-4)
autoencoder's latents. Same loop, different ``--vae``:

    z = vae.encode(x)                      # normalised with the VAE config's latent_mean / scale
    loss = E_t,eps |dit(t z + (1 - t) eps, t, y) - (z - eps)|^2
    AdamW (0.9, 0.95), wd 0, grad clip 1, constant LR, EMA 0.9999 with warm-up

At the end: the flow-matching loss on the latents of held-out images (``--val-data``; with
``--data skimage``, bundled photos the run never sees; fixed times and noise) of the initial, the
raw and the EMA weights on one line, and a final preview ``<out>/images/final_<steps>.png`` (rows:
raw, EMA samples from the same noise).

CPU demo (after examples/train_tokenizer.py):

    python examples/train_latent_dit.py --vae runs/tokenizer/vae_ema --out runs/reference --steps 300

From a latent cache (encode once with ``dmvae cache-latents``, then train without the encoder; a
cache made by another tokenizer than ``--vae`` is refused):

    dmvae cache-latents --model runs/tokenizer/vae_ema --data skimage -o runs/latents
    python examples/train_latent_dit.py --vae runs/tokenizer/vae_ema --latents runs/latents --out runs/reference

Resumes from ``<out>/checkpoints`` (mid-epoch included); under ``torchrun --nproc_per_node=N`` the
DiT is wrapped in DistributedDataParallel and noise, times and label drops are drawn for the global
batch. Writes ``<out>/dit`` and ``<out>/dit_ema`` (``LatentDiT.from_pretrained`` directories),
``<out>/metrics.jsonl`` and ``summary.json``. Real runs: ``--preset LightningDiT-XL/1 --lr 2e-4
--batch-size 32 --latents /path/to/cache --bf16 --compile --grad-checkpoint --num-workers 8``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _train_utils import (
    adamw,
    add_data_args,
    add_ema_args,
    add_run_args,
    check_source,
    fail,
    held_out,
    held_out_fm_loss,
    make_ema,
    make_loader,
    make_parser,
    maybe_compile,
    quality_line,
    resume_and_log,
    setup,
)

from dmvae._utils import eval_mode
from dmvae.autoencoder import DMVAE
from dmvae.dist import GlobalBatchRandom, local_rows, wrap_ddp
from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.training import (
    autocast,
    clip_grad_norm,
    is_main_process,
    linear_warmup,
    save_checkpoint,
)
from dmvae.training.data import to_model_input
from dmvae.training.logger import RunningMeans
from dmvae.training.sampler import TrainLoader
from dmvae.transport import FlowMatching


def build_parser(prog: str | None = None, doc: str = __doc__) -> argparse.ArgumentParser:
    p = make_parser(doc, prog)
    p.add_argument("--vae", required=True, help="frozen DMVAE (from_pretrained source), e.g. runs/tokenizer/vae_ema")
    p.add_argument("--out", required=True)
    p.add_argument("--latents", default=None, help="a latent cache directory (dmvae cache-latents) instead of --data")
    p.add_argument("--preset", default="cpu-tiny", help="'cpu-tiny' or a LatentDiT preset (LightningDiT-XL/1, ...)")
    p.add_argument("--init", default=None, help="start from this LatentDiT (from_pretrained source)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="reference 2e-4")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="0 = constant LR (the reference)")
    p.add_argument("--class-dropout", type=float, default=0.1, help="label dropout (gives the CFG null class)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing of the DiT blocks")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps of the preview samples")
    add_ema_args(p)
    add_data_args(p)
    add_run_args(p, log_every=20, image_every=0)
    return p


def make_dit(args: argparse.Namespace, vae: DMVAE, num_classes: int) -> LatentDiT:
    if args.init:
        check_source("--init", args.init)
        return LatentDiT.from_pretrained(args.init)
    z, h, _ = vae.latent_shape()
    common = dict(input_size=h, in_channels=z, num_classes=num_classes, class_dropout_prob=args.class_dropout)
    if args.preset == "cpu-tiny":
        return LatentDiT(LatentDiTConfig(patch_size=1, hidden_size=64, depth=2, num_heads=2, **common))
    return LatentDiT(LatentDiTConfig.from_preset(args.preset, **common))


def make_latent_loader(args: argparse.Namespace, vae: DMVAE) -> TrainLoader:
    from dmvae.latent_cache import LatentDataset

    try:
        cache = LatentDataset(args.latents)
        cache.check_tokenizer(vae, "--vae")
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None
    cache.latent_mean, cache.latent_scale = vae.config.latent_mean, vae.config.latent_scale  # as vae.encode
    return TrainLoader(cache, args.batch_size, seed=args.seed, num_workers=args.num_workers,
                       prefetch_factor=args.prefetch_factor)


def main(argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> dict:
    args = build_parser(prog, doc or __doc__).parse_args(argv)
    info = setup(args)
    dev = info.device
    out = Path(args.out)
    check_source("--vae", args.vae)
    vae = DMVAE.from_pretrained(args.vae).to(dev).eval().requires_grad_(False)
    if (vae.config.latent_mean, vae.config.latent_scale) == (0.0, 1.0) and is_main_process():
        print("warning: the VAE config has identity latent statistics (latent_mean 0, latent_scale 1); "
              "set them with dmvae.training.LatentStats(...).apply_to(vae) first")
    loader = make_latent_loader(args, vae) if args.latents else make_loader(args, vae.config.image_size,
                                                                           args.batch_size)
    num_classes = loader.num_classes
    torch.manual_seed(args.seed)
    dit = make_dit(args, vae, num_classes).to(dev)
    dit.enable_gradient_checkpointing(args.grad_checkpoint)
    ema = make_ema(dit, args)
    opt = adamw(dit.parameters(), dev, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sched = linear_warmup(opt, args.warmup)
    fm = FlowMatching()  # uniform t, linear path, velocity target (the reference)
    dit_ddp = wrap_ddp(maybe_compile(dit, args.compile), dev)
    drop_p = dit.config.class_dropout_prob

    ckpt_dir = out / "checkpoints"
    state = dict(dit=dit, ema=ema, opt=opt, sched=sched, data=loader)
    stage = "stage 2 (reference DiT)" if prog == "train_reference.py" else "LatentDiT (stage 2 / 5)"
    start, log = resume_and_log(args, out, state, desc="LatentDiT" + (" (cache)" if args.latents else ""))
    x_val, y_val, val_what = held_out(args, vae.config.image_size, dev)
    with torch.no_grad():
        z_val = vae.encode(x_val)  # normalised, as the training latents
    n_cls = dit.config.num_classes
    y_val = None if n_cls == 0 else (y_val if int(y_val.max()) < n_cls else torch.zeros_like(y_val))
    initial_fm = held_out_fm_loss(dit, z_val, y_val, args.seed) if start == 0 else None
    means = RunningMeans()
    history: list[dict] = []
    for step in range(start, args.steps):
        batch, y = next(loader)
        y = y.to(dev, non_blocking=True)
        if args.latents:
            z = batch.to(dev, non_blocking=True)  # (B, z, h, w), normalised
        else:
            with torch.no_grad():
                z = vae.encode(to_model_input(batch, dev), autocast=bool(args.bf16))  # (B, z, h, w), normalised
        rnd = GlobalBatchRandom(args.seed, step, z.shape[0], device=dev)  # same numbers for any world size
        t = local_rows(fm.sample_time(rnd.global_batch, generator=rnd.generator, device=dev))
        drop = {"force_drop_ids": rnd.bernoulli(drop_p)} if drop_p > 0 else {}  # CFG label dropout
        dit.train()
        with autocast(dev, enabled=args.bf16 or None):
            loss = fm.loss(dit_ddp, z, y, t=t, noise=rnd.randn(*z.shape[1:]), **drop).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(dit, 1.0)
        opt.step()
        sched.step()
        ema.update()
        means.add(loss=loss)
        log.advance()
        if log.is_log_step(step):
            history.append(log.log(step, means.pop(), lr=sched.get_last_lr()[0]))
        if args.image_every and step % args.image_every == 0 and is_main_process():
            log.images(step, "samples", preview(ema.module, vae, y[:8], args.sample_steps, args.seed))
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, keep_last=args.keep_last, **state)

    # ---- end of the stage: held-out flow-matching loss of raw and EMA weights, final preview
    raw_fm, ema_fm = (held_out_fm_loss(m, z_val, y_val, args.seed) for m in (dit, ema.module))
    quality = {"metric": "flow_matching_loss", "data": val_what, "initial": initial_fm, "raw": raw_fm, "ema": ema_fm}
    if is_main_process():
        labels = (y_val if y_val is not None else torch.zeros(x_val.shape[0], dtype=torch.long, device=dev))[:8]
        rows = [preview(m, vae, labels, args.sample_steps, args.seed) for m in (dit, ema.module)]
        log.images(args.steps, "final", torch.cat(rows), nrow=labels.shape[0])
    log.close()
    quality_line(stage, val_what, "flow-matching loss", {"initial": initial_fm, "raw": raw_fm, "EMA": ema_fm})

    summary = {"steps": args.steps, "start_step": start, "quality": quality, "history": history}
    if is_main_process():
        dit.save_pretrained(out / "dit")
        ema.module.save_pretrained(out / "dit_ema")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@torch.no_grad()
def preview(dit: LatentDiT, vae: DMVAE, labels: torch.Tensor, num_steps: int, seed: int) -> torch.Tensor:
    """Decoded Euler samples of ``dit`` for ``labels`` (fixed noise): (n, 3, H, W) in [-1, 1]."""
    from dmvae.samplers import sample

    g = torch.Generator(labels.device).manual_seed(seed)
    noise = torch.randn((labels.shape[0], *vae.latent_shape()), generator=g, device=labels.device)
    with eval_mode(dit):
        z = sample(dit, noise, labels, num_steps=num_steps, method="euler")
    return vae.decode(z, normalize=True)


if __name__ == "__main__":
    main()
