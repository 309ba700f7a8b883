"""Stage 4: fine-tune the decoder of the stage-3 autoencoder (encoder and bottleneck frozen).

After DM training the latent space is fixed; only the decoder keeps learning the reconstruction
losses (L1 + LPIPS + adaptive PatchGAN), so the latents -- and the stage-5 generator's target
distribution -- do not move. The loop is the tokenizer's, so this file runs
``examples/train_tokenizer.py`` with ``--freeze-bottleneck`` added (the encoder is frozen there by
default) and ``--init`` required:

    python examples/finetune_decoder.py --init runs/dmvae/vae --out runs/finetune --steps 200 --lpips-weight 0

The latent statistics are re-measured at the end; they stay those of the frozen encoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tokenizer import main  # noqa: E402


def run(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--init" or a.startswith("--init=") for a in argv):
        raise SystemExit("finetune_decoder.py needs --init <stage-3 DMVAE directory>")
    if "--freeze-bottleneck" not in argv:
        argv.append("--freeze-bottleneck")
    return main(argv)


if __name__ == "__main__":
    run()
