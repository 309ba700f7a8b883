"""Stage 2: fit the "real" score model (a LatentDiT) on the stage-1 tokenizer's latents.

The reference model of the DM loss in the reference recipe is a LightningDiT trained by flow matching
on the latents of the stage-1 tokenizer (reference ``train_diffusion.py``). The loop is stage 5's
(``examples/train_latent_dit.py``); this entry point runs it with this help text:

    python examples/train_reference.py --vae runs/tokenizer/vae_ema --out runs/reference --steps 300

or from a latent cache of the stage-1 tokenizer (``dmvae cache-latents``):

    python examples/train_reference.py --vae runs/tokenizer/vae_ema --latents runs/latents-s1 --out runs/reference

Stage 3 then uses ``runs/reference/dit_ema`` as the frozen real model and as the fake model's
initialisation.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_latent_dit  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    return train_latent_dit.main(argv, prog="train_reference.py", doc=__doc__)


if __name__ == "__main__":
    main()
