"""``dmvae eval-recon`` and ``dmvae eval-gen``: the evaluation protocols of ``docs/evaluation.md``.

dmvae eval-recon --model sen-ye/dmvae --data /data/imagenet/val --inception inception.pth --json recon.json
dmvae eval-gen samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception inception.pth --json gen.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from dmvae._version import __version__

_RECON_DESCRIPTION = """\
Reconstruction metrics of an autoencoder on an image folder or ImageNet-val tree: rFID of the
reconstructions against the centre-cropped originals (ADM crop), PSNR and SSIM on uint8, LPIPS
(with --lpips), and latent statistics (mean/std, per channel). Numbers do not depend on
--batch-size. --model identity evaluates the data pipeline itself (rFID 0, PSNR inf)."""

_GEN_DESCRIPTION = """\
Generation metrics of samples in ADM .npz files (uint8 NHWC under arr_0; produce them with
`dmvae sample --num-per-class 50 --npz OUT.npz`): gFID against the reference file's mu/sigma
(ADM VIRTUAL_imagenet256_labeled.npz or adm_in256_stats.npz), Inception Score, and k-NN
precision/recall (k=3) when the reference file holds images."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval-recon",
        help="rFID / PSNR / SSIM / LPIPS / latent statistics of an autoencoder",
        description=_RECON_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="DMVAE source: our directory, .safetensors, reference .pt, HF repo id, or 'identity'",
    )
    p.add_argument(
        "--config",
        default=None,
        help="preset name or config.json (needed for .safetensors / reference .pt files)",
    )
    p.add_argument(
        "--use-ema",
        dest="use_ema",
        action="store_true",
        default=None,
        help="pick the EMA weights of a reference checkpoint",
    )
    p.add_argument(
        "--no-ema",
        dest="use_ema",
        action="store_false",
        help="pick the raw weights of a reference checkpoint",
    )
    p.add_argument("--data", required=True, help="image folder or ImageNet-val tree (searched recursively)")
    p.add_argument(
        "--num", type=int, default=None, help="evaluate N images spread evenly over the folder (default: all)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per forward (default 32; does not change the numbers)",
    )
    p.add_argument("--image-size", type=int, default=256, help="centre-crop size (default 256)")
    p.add_argument(
        "--crop",
        choices=("adm", "dmvae"),
        default="adm",
        help="adm = ADM center_crop_arr (default); dmvae = reference resize-384 + centre crop",
    )
    p.add_argument(
        "--inception",
        default=None,
        help="Inception-v3 2015-12-05 weights (.pth / .safetensors / hf://owner/repo/file); "
        "default: $DMVAE_INCEPTION_WEIGHTS, then torch's hub cache",
    )
    p.add_argument(
        "--lpips",
        action="store_true",
        help="also compute LPIPS-VGG (weights from $DMVAE_LPIPS_WEIGHTS or the caches)",
    )
    p.add_argument(
        "--lpips-weights", default=None, help="LPIPS weights file(s) (implies --lpips); see dmvae.lpips"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=4,
        help="image decoding worker processes (default 4; 0 = main process)",
    )
    p.add_argument(
        "--autocast",
        action="store_true",
        help="run the autoencoder under bf16 autocast (GPU; as the reference)",
    )
    _common(p)
    p.set_defaults(func=run_recon)

    g = subparsers.add_parser(
        "eval-gen",
        help="gFID / IS / precision-recall of samples in ADM .npz files",
        description=_GEN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("npz", nargs="+", help="sample .npz file(s) (shards are concatenated)")
    g.add_argument("--ref", required=True, help="reference .npz with mu/sigma and/or arr_0 images")
    g.add_argument("--inception", default=None, help="Inception-v3 2015-12-05 weights (see eval-recon)")
    g.add_argument("--batch-size", type=int, default=100, help="images per Inception forward (default 100)")
    g.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall (default 3)")
    g.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    g.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    _common(g)
    g.set_defaults(func=run_gen)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--json", default=None, metavar="OUT", help="write the results as JSON to OUT ('-' = stdout)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _jsonable(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings ("inf"), which json.loads-ers can map back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _emit(results: dict[str, Any], out: str | None, summary_keys: tuple[str, ...]) -> None:
    payload = json.dumps(_jsonable(results), indent=2)
    if out == "-":
        print(payload)
        return
    for key in summary_keys:
        value = results.get(key)
        if value is None:
            continue
        print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")
    if out is not None:
        from dmvae.hub import atomic_write_text

        atomic_write_text(Path(out), payload + "\n")
        print(f"results written to {out}")


class _Identity(torch.nn.Module):
    """--model identity: reconstruction = input (measures the evaluation pipeline itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _load_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    if args.model == "identity":
        return _Identity()
    from dmvae.autoencoder import DMVAE

    config: Any = args.config
    if config is not None and str(config).endswith(".json"):
        from dmvae.autoencoder import DMVAEConfig

        config = DMVAEConfig.load(config)
    return DMVAE.from_pretrained(args.model, config=config, use_ema=args.use_ema, device=device)


def run_recon(args: argparse.Namespace) -> int:
    from dmvae.evaluation import evaluate_reconstruction

    device = _device(args.device)
    model = _load_model(args, device)
    lpips = None
    if args.lpips or args.lpips_weights:
        from dmvae.lpips import LPIPS

        lpips = LPIPS(weights=args.lpips_weights).to(device)
    result = evaluate_reconstruction(
        model,
        args.data,
        inception_weights=args.inception,
        lpips=lpips,
        batch_size=args.batch_size,
        num_images=args.num,
        image_size=args.image_size,
        crop=args.crop,
        device=device,
        num_workers=args.num_workers,
        autocast=args.autocast,
        progress=not args.no_progress,
    )
    out = {"dmvae_version": __version__, "model": args.model, "data": str(args.data), **result.to_dict()}
    _emit(out, args.json, ("num_images", "rfid", "psnr", "ssim", "lpips"))
    if result.latents is not None and args.json != "-":
        lat = result.latents
        print(f"{'latent_mean':>20}: {lat['latent_mean']:.6g}")
        print(f"{'latent_std':>20}: {lat['latent_std']:.6g}  (scale {lat['latent_scale']:.6g})")
    return 0


def run_gen(args: argparse.Namespace) -> int:
    from dmvae.evaluation import evaluate_generation

    result = evaluate_generation(
        args.npz,
        args.ref,
        inception_weights=args.inception,
        batch_size=args.batch_size,
        device=_device(args.device),
        precision_recall_k=None if args.no_pr else args.k,
        is_splits=args.is_splits,
        progress=not args.no_progress,
    )
    out = {
        "dmvae_version": __version__,
        "samples": [str(p) for p in args.npz],
        "reference": str(args.ref),
        **result.to_dict(),
    }
    _emit(
        out,
        args.json,
        ("num_samples", "fid", "inception_score", "inception_score_std", "precision", "recall"),
    )
    return 0
