"""``dmvae eval-recon`` and ``dmvae eval-gen``: the evaluation protocols of ``docs/evaluation.md``.

dmvae eval-recon --model sen-ye/dmvae --data /data/imagenet/val --inception inception.pth -o recon.json
dmvae eval-gen samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception inception.pth -o gen.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from dmvae._version import __version__
from dmvae.cli._common import (
    add_command,
    add_device_arg,
    add_model_args,
    add_output_args,
    check_output_file,
    default_device,
    default_num_workers,
    int_range,
    writing,
)


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "eval-recon", run_recon)
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder or ImageNet-val tree (searched recursively)")
    p.add_argument("--num", type=int_range(1), default=None,
                   help="evaluate N images spread evenly over the folder (default: all)")
    p.add_argument("--batch-size", type=int_range(1), default=32,
                   help="images per forward (does not change the numbers)")
    p.add_argument("--image-size", type=int_range(1), default=256, help="centre-crop size")
    p.add_argument("--crop", choices=("adm", "dmvae"), default="adm",
                   help="adm = ADM center_crop_arr; dmvae = reference resize-384 + centre crop")
    p.add_argument("--inception", default=None,
                   help="Inception-v3 2015-12-05 weights (.pth / .safetensors / hf://owner/repo/file); "
                   "default: $DMVAE_INCEPTION_WEIGHTS, then torch's hub cache")
    p.add_argument("--no-fid", action="store_true",
                   help="skip rFID (no Inception weights needed); LPIPS is then computed when its "
                   "weights are found, else skipped with a note")
    p.add_argument("--lpips", action="store_true",
                   help="also compute LPIPS-VGG (weights from $DMVAE_LPIPS_WEIGHTS or the caches)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS weights file(s) (implies --lpips); see dmvae.lpips")
    p.add_argument("--num-workers", type=int_range(0), default=default_num_workers(),
                   help="image decoding worker processes (0 = main process; the default fits this machine)")
    p.add_argument("--autocast", action="store_true",
                   help="run the autoencoder under bf16 autocast (GPU; as the reference)")
    _add_result_args(p)

    g = add_command(subparsers, "eval-gen", run_gen)
    g.add_argument("npz", nargs="+", help="sample .npz file(s) (shards are concatenated)")
    g.add_argument("--ref", required=True, help="reference .npz with mu/sigma and/or arr_0 images")
    g.add_argument("--inception", default=None, help="Inception-v3 2015-12-05 weights (see eval-recon)")
    g.add_argument("--batch-size", type=int_range(1), default=100, help="images per Inception forward")
    g.add_argument("--k", type=int_range(1), default=3, help="neighbourhood size of precision/recall")
    g.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    g.add_argument("--is-splits", type=int_range(1), default=10, help="Inception Score splits")
    add_device_arg(g)
    _add_result_args(g)


def _add_result_args(p: argparse.ArgumentParser) -> None:
    """``-o/--out`` (JSON results file), ``--overwrite``, ``--quiet``, ``--json`` (JSON on stdout)."""
    add_output_args(p, what="also write the results as JSON to this file", required=False)
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of the summary")


def _json_target(args: argparse.Namespace) -> tuple[bool, Path | None]:
    """(print JSON on stdout?, results file or None); the file is checked before any work."""
    out = args.out
    return bool(args.json), (check_output_file(out, overwrite=args.overwrite) if out is not None else None)


def _jsonable(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings ("inf"), which json.loads-ers can map back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _emit(results: dict[str, Any], to_stdout: bool, out: Path | None, summary_keys: tuple[str, ...]) -> None:
    from dmvae.files import atomic_write_text

    payload = json.dumps(_jsonable(results), indent=2)
    if out is not None:
        with writing(out):
            atomic_write_text(out, payload + "\n")
    if to_stdout:
        print(payload)
        return
    for key in summary_keys:
        value = results.get(key)
        if value is None:
            continue
        print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")
    lat = results.get("latents")
    if lat:
        print(f"{'latent_mean':>20}: {lat['latent_mean']:.6g}")
        print(f"{'latent_std':>20}: {lat['latent_std']:.6g}  (scale {lat['latent_scale']:.6g})")
    if out is not None:
        print(f"results written to {out}")


def _load_model(args: argparse.Namespace, device: str) -> Any:
    if args.model == "identity":
        import torch

        return torch.nn.Identity()  # reconstruction = input: measures the evaluation pipeline itself
    from dmvae.cli._common import load_autoencoder

    args.device = device
    return load_autoencoder(args)


def _lpips(args: argparse.Namespace, device: str) -> Any:
    """LPIPS when asked for; with --no-fid also when its weights are simply there."""
    from dmvae.lpips import LPIPS, LPIPSWeightsError

    if args.lpips or args.lpips_weights:
        return LPIPS(weights=args.lpips_weights).to(device)
    if not args.no_fid:
        return None
    try:
        return LPIPS().to(device)
    except LPIPSWeightsError as e:
        print(f"note: LPIPS skipped: {str(e).splitlines()[0]}", file=sys.stderr)
        return None


def run_recon(args: argparse.Namespace) -> int:
    """rFID / PSNR / SSIM / LPIPS / latent statistics of an autoencoder

    Reconstruction metrics of an autoencoder on an image folder or ImageNet-val tree: rFID of the
    reconstructions against the centre-cropped originals (ADM crop), PSNR and SSIM on uint8, LPIPS
    (with --lpips), and latent statistics (mean/std, per channel). Numbers do not depend on
    --batch-size. --model identity evaluates the data pipeline itself (rFID 0, PSNR inf).
    --no-fid needs no Inception weights: PSNR / SSIM / latent statistics, and LPIPS when its
    weights are found.
    """
    from dmvae.evaluation import evaluate_reconstruction

    to_stdout, out = _json_target(args)
    device = default_device(args.device)
    model = _load_model(args, device)
    result = evaluate_reconstruction(
        model,
        args.data,
        inception_weights=args.inception,
        lpips=_lpips(args, device),
        batch_size=args.batch_size,
        num_images=args.num,
        image_size=args.image_size,
        crop=args.crop,
        device=device,
        num_workers=args.num_workers,
        autocast=args.autocast,
        progress=not args.quiet,
        fid=not args.no_fid,
    )
    res = {"dmvae_version": __version__, "model": args.model, "data": str(args.data), **result.to_dict()}
    _emit(res, to_stdout, out, ("num_images", "rfid", "psnr", "ssim", "lpips"))
    return 0


def run_gen(args: argparse.Namespace) -> int:
    """gFID / IS / precision-recall of samples in ADM .npz files

    Generation metrics of samples in ADM .npz files (uint8 NHWC under arr_0; produce them with
    `dmvae sample --num-per-class 50 -o OUT.npz`): gFID against the reference file's mu/sigma
    (ADM VIRTUAL_imagenet256_labeled.npz or adm_in256_stats.npz), Inception Score, and k-NN
    precision/recall (k=3) when the reference file holds images.
    """
    from dmvae.evaluation import evaluate_generation

    to_stdout, out = _json_target(args)
    result = evaluate_generation(
        args.npz,
        args.ref,
        inception_weights=args.inception,
        batch_size=args.batch_size,
        device=default_device(args.device),
        precision_recall_k=None if args.no_pr else args.k,
        is_splits=args.is_splits,
        progress=not args.quiet,
    )
    res = {
        "dmvae_version": __version__,
        "samples": [str(p) for p in args.npz],
        "reference": str(args.ref),
        **result.to_dict(),
    }
    _emit(res, to_stdout, out, ("num_samples", "fid", "inception_score", "inception_score_std", "precision", "recall"))
    return 0
