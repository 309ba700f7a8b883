"""Helpers shared by the CLI sub-commands."""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def add_model_args(parser: argparse.ArgumentParser, *, default: str | None = "sen-ye/dmvae") -> None:
    parser.add_argument(
        "--model",
        default=default,
        required=default is None,
        help="autoencoder: our directory, a .safetensors/.pt file or a Hugging Face repo id "
        f"(default: {default})",
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="config preset for weights without a config.json (reference .pt files), e.g. dmvae-l",
    )
    parser.add_argument(
        "--ema", action="store_true", help="load the EMA weights of a reference checkpoint"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def default_device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_autoencoder(args: argparse.Namespace):
    from dmvae.autoencoder import DMVAE

    return DMVAE.from_pretrained(
        args.model, config=args.preset, use_ema=args.ema, device=default_device(args.device)
    )


def collect_images(inputs: list[str]) -> list[Path]:
    """Expand files and directories (recursively) into a sorted list of image files."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {p}")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    return paths


def batched(items: list, size: int):
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]
