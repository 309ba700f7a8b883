"""Sampling with a LatentDiT and decoding with a DMVAE, end to end, on tiny random models.

Runs on a CPU in well under a minute. It shows the pieces, not good images: the models here are
random. Real use loads the released checkpoints instead:

    dit = LatentDiT.from_pretrained("path/to/ep800.pt", config="LightningDiT-XL/1")  # EMA weights
    vae = DMVAE.from_pretrained("sen-ye/dmvae")

and then samples exactly as below (the release setting is the SDE with ``num_steps=249``, no CFG).

    python examples/sample.py --out /tmp/dmvae_example
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmvae.autoencoder import DMVAE, DMVAEConfig
from dmvae.cli._common import HelpFormatter, add_threads_arg, apply_threads
from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.generate import generate_npz
from dmvae.image import to_uint8_numpy
from dmvae.samplers import sample
from dmvae.transport import FlowMatching


def tiny_models() -> tuple[LatentDiT, DMVAE]:
    vae = DMVAE(DMVAEConfig(
        image_size=64, encoder="vit_base_patch14_dinov2.lvd142m",
        encoder_kwargs=dict(embed_dim=48, depth=1, num_heads=2), patch_size=16, bottleneck_dim=64,
        z_channels=4, decoder_channels=32, decoder_channel_mult=(1, 1, 1, 1), decoder_num_res_blocks=1,
    )).eval()
    # the DiT models the VAE's (normalised) latent grid: 4 channels, 4x4
    dit = LatentDiT(LatentDiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=64,
                                    depth=2, num_heads=2, num_classes=10))
    return dit, vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", default="dmvae_example", help="output directory")
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dit, vae = tiny_models()

    # 1. a few flow-matching steps on the latents of one image (t = 1 data, t = 0 noise)
    from skimage.data import astronaut

    img = torch.from_numpy(astronaut()[::8, ::8].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(img.expand(8, -1, -1, -1))  # (8, 4, 4, 4), normalised
    labels = torch.arange(8) % 10
    fm = FlowMatching()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3, betas=(0.9, 0.95))
    dit.train()
    for step in range(30):
        loss, per_sample = fm.loss(dit, latents, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"step {step:2d}  flow-matching loss {loss.item():.4f}")
    dit.eval()

    # 2. sample: ODE Euler with CFG and a shifted grid, Heun, and the release SDE
    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 1, 2, 3])
    runs = {
        "euler_cfg4_shift2.5": dict(num_steps=20, method="euler", cfg_scale=4.0, time_shift=2.5),
        "heun": dict(num_steps=10, method="heun"),
        "sde_release": dict(num_steps=249, method="euler-maruyama", last_step_size=0.04,
                            generator=torch.Generator().manual_seed(2)),
    }
    for name, kw in runs.items():
        z = sample(dit, noise, classes, **kw)
        with torch.no_grad():
            images = to_uint8_numpy(vae.decode(z, normalize=True))  # (4, 64, 64, 3) uint8
        Image.fromarray(np.concatenate(list(images), axis=1)).save(out / f"{name}.png")
        print(f"{name:22s} latents std {z.std():.3f} -> {out / (name + '.png')}")

    # 3. a class-balanced ADM-format npz (resumable; rerun to see completed shards skipped)
    npz = generate_npz(dit, vae, out / "samples.npz", num_per_class=2, num_classes=10, batch_size=8,
                       num_steps=10, method="heun", progress=False)
    with np.load(npz) as f:
        print(f"{npz}: arr_0 {f['arr_0'].shape} {f['arr_0'].dtype}, labels {np.bincount(f['arr_1'])}")


if __name__ == "__main__":
    main()
