"""Stage 2: fit the "real" score model (a LatentDiT) on the stage-1 tokenizer's latents.

The reference model of the DM loss in the reference recipe is a LightningDiT trained by flow matching
on the latents of the stage-1 tokenizer (reference ``train_diffusion.py``). The loop is the same as
stage 5's, so this file runs ``examples/train_latent_dit.py`` (see its docstring for every option):

    python examples/train_reference.py --vae runs/tokenizer/vae_ema --out runs/reference --steps 300

Stage 3 then uses ``runs/reference/dit_ema`` as the frozen real model and as the fake model's
initialisation.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_latent_dit import main  # noqa: E402

if __name__ == "__main__":
    main()
