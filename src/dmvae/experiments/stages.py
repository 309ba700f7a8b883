"""The training stages of Table 1 (paper App. B), built from the library's public pieces.

* stage 1 (:func:`train_autoencoder`): the autoencoder on L1 reconstruction (the SSL and
  Supervised families with their pretrained encoder frozen);
* stage 2 (:func:`fit_teacher`): a LatentDiT fitted by flow matching on the stage-1 latents, the
  reference p_r of data-derived rows (class-conditional where the reference has the classes);
* stage 3 (:func:`train_dm_stage`): the paper's joint loop (Sec. 3.1) on two time-scales: the fake
  score takes ``fake_every`` flow-matching steps (Eq. 7) per autoencoder step on
  ``L1 + λ L_DM`` (Eq. 8-9), with a smaller learning rate than the autoencoder;
* stage 4 (:func:`train_autoencoder` with ``part="decoder"``): decoder-only fine-tune (B.4);
* the downstream generator (:func:`train_downstream`): a class-conditional LatentDiT with an EMA
  of its weights, handed to a callback at every budget of ``dit_budgets``.

Nothing here seeds the global RNG: models are built and trained inside
:func:`~dmvae.experiments.nets.seeded`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dmvae import (
    DMVAE,
    DistributionMatchingLoss,
    DMVAEConfig,
    LatentDiT,
    fit_reference_model,
)
from dmvae.ema import EMA
from dmvae.experiments.nets import cosine_schedule, optimizer_step, seeded
from dmvae.experiments.settings import Table1Settings
from dmvae.latent_stats import LatentStats
from dmvae.losses import ReconstructionLoss
from dmvae.transport import FlowMatching

__all__ = [
    "autoencoder_config",
    "encode_all",
    "fit_teacher",
    "make_dit",
    "measure_latent_stats",
    "train_autoencoder",
    "train_dm_stage",
    "train_downstream",
]


def autoencoder_config(s: Table1Settings) -> DMVAEConfig:
    return DMVAEConfig.from_preset(
        "dmvae-tiny", image_size=s.image_size, patch_size=s.patch_size, z_channels=s.z_channels,
        decoder_channels=s.decoder_channels, decoder_channel_mult=tuple(s.decoder_channel_mult),
        decoder_num_res_blocks=s.decoder_num_res_blocks,
    )


def make_dit(s: Table1Settings, latent_shape: tuple[int, ...], num_classes: int) -> LatentDiT:
    """``num_classes=0``: an unconditional velocity model; else label dropout 0.1 (a null class)."""
    c, h, _ = latent_shape
    return LatentDiT(
        input_size=h, patch_size=1, in_channels=c, hidden_size=s.dit_hidden, depth=s.dit_depth,
        num_heads=s.dit_heads, num_classes=num_classes, class_dropout_prob=0.1 if num_classes else 0.0,
    )


def fit_teacher(s: Table1Settings, latents: Tensor, labels: Tensor | None, num_classes: int, seed: int) -> LatentDiT:
    """Stage 2 (paper App. B.2): a LatentDiT fitted on latents (N, C, h, w), conditional when
    ``labels`` are given; frozen, eval mode."""
    with seeded(seed):
        model = make_dit(s, tuple(latents.shape[1:]), num_classes if labels is not None else 0)
        data = latents if labels is None else (latents, labels)
        return fit_reference_model(model, data, steps=s.teacher_steps, batch_size=s.dit_batch, lr=s.teacher_lr,
                                   lr_schedule=s.teacher_schedule, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def encode_all(vae: DMVAE, images: Tensor, normalize: bool = True, chunk: int = 500) -> Tensor:
    vae.eval()
    return torch.cat([vae.encode(part, normalize=normalize) for part in images.split(chunk)])


def measure_latent_stats(vae: DMVAE, images: Tensor) -> tuple[float, float]:
    """Exact mean / 1-std of all latent entries of ``images``, written into ``vae.config``."""
    stats = LatentStats()
    stats.update(encode_all(vae, images, normalize=False))
    return stats.apply_to(vae, sync=False)


def _trainable(vae: DMVAE, part: str) -> list[nn.Parameter]:
    """``"all"``: every parameter that requires grad; ``"decoder"``: the decoder alone (stage 4)."""
    if part == "decoder":
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
    elif part != "all":
        raise ValueError(f"part must be 'all' or 'decoder', got {part!r}")
    return [p for p in vae.parameters() if p.requires_grad]


def train_autoencoder(vae: DMVAE, images: Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
                      part: str = "all") -> DMVAE:
    """Stage 1 (``part="all"``: whatever requires grad) or stage 4 (``part="decoder"``) on L1."""
    g = torch.Generator().manual_seed(seed)
    rec_loss = ReconstructionLoss(l1_weight=1.0, l2_weight=0.0, lpips_weight=0.0)
    opt = torch.optim.AdamW(_trainable(vae, part), lr=lr, weight_decay=0.0)
    sched = cosine_schedule(opt, steps)
    vae.train()
    with seeded(seed):
        for _ in range(steps):
            x = images[torch.randint(images.shape[0], (batch_size,), generator=g)]  # (B, 3, S, S)
            loss, _ = rec_loss(vae(x).reconstruction, x)
            optimizer_step(opt, loss, sched)
    return vae.eval()


def train_dm_stage(
    vae: DMVAE, images: Tensor, labels: Tensor, *, s: Table1Settings, seed: int,
    dm: DistributionMatchingLoss | None, dm_weight: float, conditional: bool,
    on_start: Callable[[], None] | None = None,
) -> DMVAE:
    """Stage 3 (paper Sec. 3.1) on the whole autoencoder (encoder unfrozen), ``s.stage3_steps``
    autoencoder steps of ``L1 + dm_weight L_DM``.

    With ``dm``, every iteration the fake score ``dm.fake`` takes one flow-matching step (Eq. 7,
    AdamW (0.9, 0.95), lr ``s.fake_lr``, weight decay ``s.fake_weight_decay``) on the detached
    normalised latents of a fresh batch, and every ``s.fake_every``-th iteration the autoencoder
    steps (lr ``s.stage3_lr``). Labels go to both networks when ``conditional`` (the fake drops
    them 10 % of the time, training its null branch for the CFG). Without ``dm`` (λ 0 rows) the
    same autoencoder steps run alone.
    """
    g = torch.Generator().manual_seed(seed)
    rec_loss = ReconstructionLoss(l1_weight=1.0, l2_weight=0.0, lpips_weight=0.0)
    vae.requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.stage3_lr, weight_decay=0.0)
    sched = cosine_schedule(opt, s.stage3_steps)
    fake_opt = None
    if dm is not None:
        dm.fake.train().requires_grad_(True)
        fake_opt = torch.optim.AdamW(dm.fake.parameters(), lr=s.fake_lr, betas=(0.9, 0.95),
                                     weight_decay=s.fake_weight_decay)
    if on_start is not None:
        on_start()
    every = s.fake_every if dm is not None else 1
    vae.train()
    with seeded(seed):
        for it in range(s.stage3_steps * every):
            idx = torch.randint(images.shape[0], (s.batch_size,), generator=g)
            x, y = images[idx], (labels[idx] if conditional else None)  # (B, 3, S, S), (B,)
            if it % every == 0:
                out = vae(x)
                loss, _ = rec_loss(out.reconstruction, x)
                if dm is not None and dm_weight > 0:
                    l_dm, _ = dm(out.normalized_latents, y, generator=g)
                    loss = loss + dm_weight * l_dm
                optimizer_step(opt, loss, sched)
                z = out.normalized_latents.detach()
            elif dm is not None:
                with torch.no_grad():
                    z = vae.encode(x)  # (B, C, h, w), normalised with the (fixed) stage-1 statistics
            if dm is not None:
                f_loss, _ = dm.fake_loss(z, y, generator=g)
                optimizer_step(fake_opt, f_loss)
    if dm is not None:
        dm.fake.eval().requires_grad_(False)
    return vae.eval()


def _ema(model: nn.Module, decay: float) -> EMA:
    """The library's EMA, with its warm-up where this version of dmvae.ema has one."""
    if "warmup" in inspect.signature(EMA).parameters:
        return EMA(model, decay=decay, warmup=True)
    return EMA(model, decay=decay)


def train_downstream(s: Table1Settings, latents: Tensor, labels: Tensor, num_classes: int, seed: int,
                     on_budget: Callable[[int, nn.Module], None]) -> None:
    """The downstream class-conditional LatentDiT (paper B.5 in miniature) on latents (N, C, h, w):
    flow matching, AdamW (0.9, 0.95) at constant ``s.dit_lr``, grad clip 1, an EMA of the weights;
    ``on_budget(step, ema_model)`` at every step count of ``s.dit_budgets`` (the EMA model in eval
    mode; the callback must not train it)."""
    g = torch.Generator().manual_seed(seed)
    fm = FlowMatching()
    with seeded(seed):
        model = make_dit(s, tuple(latents.shape[1:]), num_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=s.dit_lr, betas=(0.9, 0.95), weight_decay=0.0)
        ema = _ema(model, s.dit_ema)
        budgets = set(s.dit_budgets)
        model.train()
        for step in range(1, max(budgets) + 1):
            idx = torch.randint(latents.shape[0], (s.dit_batch,), generator=g)
            loss = fm.loss(model, latents[idx], labels[idx], generator=g).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.update()
            if step in budgets:
                on_budget(step, ema.module.eval())
