"""``dmvae reconstruct``, ``dmvae encode`` and ``dmvae decode``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmvae.cli._common import add_model_args, batched, collect_images, load_autoencoder


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        help="encode and decode images, write the reconstructions as PNG",
        description="Centre-crop (ADM) each image to the model's resolution, encode, decode, and "
        "write <name>.png to OUT_DIR. Prints the PSNR of each reconstruction.",
    )
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--size", type=int, default=None, help="crop size (default: the model's image_size)")
    p.add_argument("--batch-size", type=int, default=8)
    add_model_args(p)
    p.set_defaults(func=run_reconstruct)

    p = subparsers.add_parser(
        "encode",
        help="encode a folder of images to a latents .safetensors file",
        description="Writes tensor 'latents' (N, C, h, w), normalised with the model's "
        "latent_mean/latent_scale unless --raw, plus the file names in the metadata.",
    )
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--size", type=int, default=None, help="crop size (default: the model's image_size)")
    p.add_argument("--raw", action="store_true", help="store raw (un-normalised) latents")
    p.add_argument("--batch-size", type=int, default=8)
    add_model_args(p)
    p.set_defaults(func=run_encode)

    p = subparsers.add_parser(
        "decode",
        help="decode a latents .safetensors file to PNG images",
        description="Reads tensor 'latents' written by `dmvae encode` (or any (N, C, h, w) "
        "tensor under --key) and writes one PNG per latent.",
    )
    p.add_argument("latents", help="input .safetensors file")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--key", default="latents", help="tensor name in the file (default: latents)")
    p.add_argument(
        "--raw", action="store_true", help="the latents are raw (default: read from the file's metadata)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    add_model_args(p)
    p.set_defaults(func=run_decode)


def _load_batch(paths: list[Path], size: int):
    from dmvae.image import center_crop_arr, load_image, pil_to_tensor

    return pil_to_tensor([center_crop_arr(load_image(p), size) for p in paths])


def run_reconstruct(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from dmvae.image import tensor_to_pil

    paths = collect_images(args.images)
    model = load_autoencoder(args)
    size = args.size or model.config.image_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    with torch.no_grad(), tqdm(total=len(paths), desc="reconstruct", unit="img") as bar:
        for chunk in batched(paths, args.batch_size):
            x = _load_batch(chunk, size)
            rec = model.decode(model.encode(x)).cpu()
            for p, xi, ri, img in zip(chunk, x, rec, tensor_to_pil(rec)):
                name = _unique(p.stem, names)
                img.save(out / f"{name}.png")
                mse = ((ri.clamp(-1, 1) - xi) / 2).pow(2).mean().item()
                psnr = float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()
                tqdm.write(f"{p} -> {out / (name + '.png')}  PSNR {psnr:.2f} dB")
                bar.update(1)
    return 0


def run_encode(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from dmvae.hub import atomic_save_safetensors

    paths = collect_images(args.images)
    model = load_autoencoder(args)
    size = args.size or model.config.image_size
    latents = []
    with torch.no_grad(), tqdm(total=len(paths), desc="encode", unit="img") as bar:
        for chunk in batched(paths, args.batch_size):
            latents.append(model.encode(_load_batch(chunk, size), normalize=not args.raw).float().cpu())
            bar.update(len(chunk))
    z = torch.cat(latents)
    metadata = {
        "files": json.dumps([str(p) for p in paths]),
        "normalized": json.dumps(not args.raw),
        "latent_mean": json.dumps(model.config.latent_mean),
        "latent_scale": json.dumps(model.config.latent_scale),
        "image_size": json.dumps(size),
    }
    atomic_save_safetensors({"latents": z}, args.out, metadata=metadata)
    print(f"wrote {tuple(z.shape)} latents to {args.out}")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from dmvae.hub import read_safetensors
    from dmvae.image import tensor_to_pil

    tensors = read_safetensors(args.latents)
    if args.key not in tensors:
        raise KeyError(f"{args.latents} has no tensor {args.key!r}; found {sorted(tensors)}")
    z = tensors[args.key]
    with safe_open(args.latents, framework="pt") as f:
        meta = f.metadata() or {}
    normalized = False if args.raw else json.loads(meta.get("normalized", "true"))
    files = json.loads(meta["files"]) if "files" in meta else None
    model = load_autoencoder(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    index = 0
    with torch.no_grad(), tqdm(total=len(z), desc="decode", unit="img") as bar:
        for start in range(0, len(z), args.batch_size):
            chunk = z[start : start + args.batch_size]
            for img in tensor_to_pil(model.decode(chunk, normalize=normalized).cpu()):
                stem = Path(files[index]).stem if files and index < len(files) else f"{index:06d}"
                img.save(out / f"{_unique(stem, names)}.png")
                index += 1
            bar.update(len(chunk))
    print(f"wrote {index} images to {out}")
    return 0


def _unique(stem: str, taken: set[str]) -> str:
    name, k = stem, 1
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    taken.add(name)
    return name
