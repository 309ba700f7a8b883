"""Stage 4: fine-tune the decoder of the stage-3 autoencoder (encoder and bottleneck frozen).

After DM training the latent space is fixed; only the decoder keeps learning the reconstruction
losses (L1 + LPIPS + adaptive PatchGAN), so the latents -- and the stage-5 generator's target
distribution -- do not move. The loop is the tokenizer's (``examples/train_tokenizer.py``, every
option below); this entry point adds ``--freeze-bottleneck`` (the encoder is frozen there by
default) and requires ``--init``:

    python examples/finetune_decoder.py --init runs/dmvae/vae --out runs/finetune --steps 200 --lpips-weight 0

The latent statistics are re-measured at the end; they stay those of the frozen encoder, and a latent
cache of the stage-3 autoencoder stays valid for the fine-tuned one (same encoder hash).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_tokenizer  # noqa: E402
from _train_utils import fail  # noqa: E402


def run(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    if not wants_help and not any(a == "--init" or a.startswith("--init=") for a in argv):
        raise fail("stage 4 needs --init <stage-3 DMVAE directory> (e.g. --init runs/dmvae/vae)")
    if "--freeze-bottleneck" not in argv:
        argv.append("--freeze-bottleneck")
    return train_tokenizer.main(argv, prog="finetune_decoder.py", doc=__doc__)


main = run

if __name__ == "__main__":
    run()
