"""Small-scale check of the paper's claim: the DM term pulls the latent distribution to the reference.

Pipeline (CPU, scikit-image photos, the examples' tiny models):

1. stage 1: ``examples/train_tokenizer.py`` for ``--stage1-steps``;
2. a LatentDiT fitted on the stage-1 latents (``examples/train_latent_dit.py``); it models the
   current q(z) and initialises the fake score;
3. from the same stage-1 model, ``--stage3-steps`` of ``examples/train_dmvae.py`` twice:
   - **DM**: real model = the reference prior (``prior:gaussian``, N(0, I) on the normalised latents),
     ``--dm-weight`` > 0;
   - **baseline**: the identical loop with ``--dm-weight 0`` (same data, steps, optimiser, GAN).

Then, on held-out random crops, the energy distance between each model's normalised latents
(flattened per image) and samples of the reference (also after re-standardising the latents with
their own mean / std, which separates the distribution's shape from a drift of its scale), and the
reconstruction PSNR.

    python benchmarks/dm_experiment.py --out runs/dm_experiment

Prints one JSON object with both numbers for both models (also saved to ``<out>/results.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_dmvae  # noqa: E402
import train_latent_dit  # noqa: E402
import train_tokenizer  # noqa: E402

from dmvae.autoencoder import DMVAE  # noqa: E402
from dmvae.metrics import energy_distance  # noqa: E402
from dmvae.priors import create_prior  # noqa: E402
from dmvae.training import TrainLoader, build_dataset, to_model_input, train_transform  # noqa: E402


@torch.no_grad()
def evaluate(vae_dir: Path, prior_name: str, data: object, n_batches: int, batch: int) -> dict:
    vae = DMVAE.from_pretrained(vae_dir).eval()
    lats, psnrs = [], []
    loader = TrainLoader(data, batch, seed=10**8)  # held-out crops: a seed training never uses
    for _ in range(n_batches):
        x = to_model_input(next(loader)[0])
        z = vae.encode(x)  # (B, z, h, w), normalised with the config's (stage-1) statistics
        x_hat = vae.decode(z).clamp(-1, 1)
        mse = ((x_hat - x) / 2).pow(2).flatten(1).mean(1)  # on [0, 1]
        psnrs += (-10 * torch.log10(mse.clamp_min(1e-12))).tolist()
        lats.append(z.flatten(1))
    lat = torch.cat(lats)  # (N, z*h*w)
    prior = create_prior(prior_name, shape=vae.latent_shape())
    ref = prior.sample(lat.shape[0] * 2, generator=torch.Generator().manual_seed(1234)).flatten(1)
    # the same after standardising with the latents' own global mean / std: measures the shape of
    # q(z) apart from the scale drift that fixed (stage-1) latent statistics let through
    lat_std = (lat - lat.mean()) / lat.std()
    return {
        "energy_distance": energy_distance(lat, ref),
        "energy_distance_restandardised": energy_distance(lat_std, ref),
        "psnr": sum(psnrs) / len(psnrs),
        "latent_std": lat.std().item(),
        "latent_mean": lat.mean().item(),
        "n_images": lat.shape[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/dm_experiment")
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--dit-steps", type=int, default=300)
    p.add_argument("--stage3-steps", type=int, default=300)
    p.add_argument("--dm-weight", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=2e-4, help="stage-3 VAE and fake lr")
    p.add_argument("--vae-every", type=int, default=5)
    p.add_argument("--prior", default="gaussian")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    t0 = time.time()
    common = ["--lpips-weight", "0", "--seed", str(args.seed), "--log-every", "50"]

    s1 = out / "stage1"
    if not (s1 / "vae_ema").is_dir():
        train_tokenizer.main(["--out", str(s1), "--steps", str(args.stage1_steps), *common])
    dit = out / "dit"
    if not (dit / "dit_ema").is_dir():
        train_latent_dit.main(["--vae", str(s1 / "vae_ema"), "--out", str(dit), "--steps", str(args.dit_steps),
                               "--seed", str(args.seed), "--log-every", "100", "--class-dropout", "0"])
    runs = {}
    for name, weight in (("dm", args.dm_weight), ("baseline", 0.0)):
        d = out / name
        if not (d / "vae").is_dir():
            train_dmvae.main([
                "--vae", str(s1 / "vae_ema"), "--real", f"prior:{args.prior}", "--fake-init", str(dit / "dit"),
                "--out", str(d), "--steps", str(args.stage3_steps), "--dm-weight", str(weight), "--dm-cfg", "1",
                "--lr", str(args.lr), "--fake-lr", str(args.lr), "--vae-every", str(args.vae_every), *common,
            ])
        runs[name] = d / "vae"

    data = build_dataset("skimage", train_transform(DMVAE.from_pretrained(s1 / "vae_ema").config.image_size))
    results = {"stage1": evaluate(s1 / "vae_ema", args.prior, data, args.eval_batches, 16)}
    for name, d in runs.items():
        results[name] = evaluate(d, args.prior, data, args.eval_batches, 16)
    results["settings"] = {k: v for k, v in vars(args).items()}
    results["ed_ratio_dm_vs_baseline"] = results["dm"]["energy_distance"] / results["baseline"]["energy_distance"]
    results["ed_restandardised_ratio"] = (
        results["dm"]["energy_distance_restandardised"] / results["baseline"]["energy_distance_restandardised"]
    )
    results["psnr_cost_db"] = results["baseline"]["psnr"] - results["dm"]["psnr"]
    results["minutes"] = (time.time() - t0) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    if not math.isfinite(results["ed_ratio_dm_vs_baseline"]):
        raise SystemExit("non-finite energy distance")


if __name__ == "__main__":
    main()
