"""``dmvae reconstruct``, ``dmvae encode`` and ``dmvae decode``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from dmvae.cli._common import (
    add_command,
    add_model_args,
    add_output_args,
    batched,
    check_output_file,
    check_output_files,
    int_range,
    load_autoencoder,
    writing,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "reconstruct", run_reconstruct)
    _add_image_inputs(p, what="output directory")
    p.add_argument("--json", action="store_true", help="print one JSON object per image (input, output, psnr)")
    add_model_args(p)

    p = add_command(subparsers, "encode", run_encode)
    _add_image_inputs(p, what="output .safetensors file")
    p.add_argument("--raw", action="store_true", help="store raw (un-normalised) latents")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_model_args(p)

    p = add_command(subparsers, "decode", run_decode)
    p.add_argument("latents", help="input .safetensors file")
    add_output_args(p, what="output directory")
    p.add_argument("--key", default="latents", help="tensor name in the file")
    p.add_argument("--raw", action="store_true", help="the latents are raw (default: read from the file's metadata)")
    p.add_argument("--batch-size", type=int_range(1), default=8, help="latents per model call")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_model_args(p)


def _add_image_inputs(p: argparse.ArgumentParser, what: str) -> None:
    """The image inputs of reconstruct and encode: files or folders, the output, the crop size, the
    batch size."""
    p.add_argument("images", nargs="+", help="image files or directories")
    add_output_args(p, what=what)
    p.add_argument("--image-size", type=int_range(1), default=None,
                   help="centre-crop size (default: the model's image_size)")
    p.add_argument("--batch-size", type=int_range(1), default=8, help="images per model call")


def _crops(paths: list[Path], size: int, warn: bool = True) -> list[Any]:
    """ADM centre crops (PIL, size x size) of the images; a note for each upscaled image."""
    from dmvae.image import center_crop_arr, load_image

    out = []
    for p in paths:
        img = load_image(p)
        if warn and min(img.size) < size:
            print(f"note: {p} is {img.size[0]}x{img.size[1]}, smaller than the {size}x{size} crop: "
                  "it is upscaled (bicubic) first", file=sys.stderr)  # fmt: skip
        out.append(center_crop_arr(img, size))
    return out


def _unique(stem: str, taken: set[str]) -> str:
    name, k = stem, 1
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    taken.add(name)
    return name


_UNSAFE = re.compile(r"[^\w.\-+=@,() ]", flags=re.UNICODE)


def _safe_stem(name: Any, index: int) -> str:
    """A file stem that cannot leave the output directory: the base name of ``name`` (either
    separator), without control / path characters or leading dots; ``{index:06d}`` if nothing
    is left."""
    text = str(name).replace("\\", "/").split("/")[-1]
    stem = text.rsplit(".", 1)[0] if "." in text.lstrip(".") else text
    stem = _UNSAFE.sub("_", stem).strip(" ").lstrip(".")[:200]
    return stem or f"{index:06d}"


def run_reconstruct(args: argparse.Namespace) -> int:
    """encode and decode images, write the reconstructions as PNG

    Centre-crop (ADM) each image to the model's resolution, encode, decode, and write <name>.png to
    OUT, keeping the sub-folders of a folder input (cats/a.jpg -> OUT/cats/a.png). Prints the PSNR
    of each reconstruction. Images smaller than the crop are upscaled (with a note).
    """
    import torch
    from tqdm.auto import tqdm

    from dmvae.image import pil_to_tensor, save_image, tensor_to_pil, to_uint8
    from dmvae.metrics import psnr

    paths, rel, _, _ = _relative_names(args.images)  # a folder's sub-folders are kept: cats/a.jpg -> cats/a.png
    taken: set[str] = set()
    names = [_unique(_rel_stem(r), taken) + ".png" for r in rel]
    out = check_output_files(args.out, names, overwrite=args.overwrite)  # before loading the model
    model = load_autoencoder(args)
    size = args.image_size or model.config.image_size
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), tqdm(total=len(paths), desc="reconstruct", unit="img", disable=args.quiet) as bar:
        for chunk in batched(list(range(len(paths))), args.batch_size):
            x = pil_to_tensor(_crops([paths[i] for i in chunk], size))  # (b, 3, S, S) in [-1, 1]
            rec = model.reconstruct(x, output_type="pt").float().cpu()  # (b, 3, S, S) float
            scores = psnr(to_uint8(x), to_uint8(rec))  # on the saved 8-bit images
            for i, img, score in zip(chunk, tensor_to_pil(rec), scores.tolist()):
                target = out / names[i]
                target.parent.mkdir(parents=True, exist_ok=True)
                with writing(target):
                    save_image(img, target)
                if args.json:
                    print(json.dumps({"input": str(paths[i]), "output": str(target), "psnr": score}))
                else:
                    tqdm.write(f"{paths[i]} -> {target}  PSNR {score:.2f} dB")
                bar.update(1)
    return 0


def _rel_stem(rel: str) -> str:
    """``cats/a.jpg`` -> ``cats/a``: the relative path without its suffix, each part made safe."""
    parts = rel.split("/")
    dirs = [_safe_stem(d + ".x", 0) for d in parts[:-1]]  # no suffix to strip: the ".x" is removed
    return "/".join([*dirs, _safe_stem(parts[-1], 0)])


def _relative_names(inputs: list[str]) -> tuple[list[Path], list[str], list[int] | None, list[str] | None]:
    """Files of the inputs, their names relative to their input folder, and class labels when the
    input is one folder of class sub-folders."""
    from dmvae.image import folder_class_labels, list_images

    paths: list[Path] = []
    rel: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            paths += found
            rel += [f.relative_to(p).as_posix() for f in found]
        elif p.is_file():
            paths.append(p)
            rel.append(p.name)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    labels = classes = None
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        found = folder_class_labels(inputs[0], paths)
        if found is not None:
            labels, classes = found
    return paths, rel, labels, classes


def run_encode(args: argparse.Namespace) -> int:
    """encode images to a latents .safetensors file

    Writes tensor 'latents' (N, C, h, w), normalised with the model's latent_mean/latent_scale
    unless --raw, and, for one folder of class sub-folders (<root>/<class>/*), tensor 'labels' (N,)
    with the sorted class index. The metadata holds the file paths relative to their input folder
    ('files'), the class names ('classes') and the normalisation.
    """
    import torch
    from tqdm.auto import tqdm

    from dmvae.image import pil_to_tensor
    from dmvae.latent_files import save_latents

    paths, rel, labels, classes = _relative_names(args.images)
    out = check_output_file(args.out, overwrite=args.overwrite)
    model = load_autoencoder(args)
    size = args.image_size or model.config.image_size
    latents = []
    with torch.no_grad(), tqdm(total=len(paths), desc="encode", unit="img", disable=args.quiet) as bar:
        for chunk in batched(paths, args.batch_size):
            latents.append(model.encode(pil_to_tensor(_crops(chunk, size)), normalize=not args.raw).float().cpu())
            bar.update(len(chunk))
    z = torch.cat(latents)
    with writing(out):
        save_latents(out, z, normalized=not args.raw, files=rel, labels=labels, classes=classes,
                     latent_mean=model.config.latent_mean, latent_scale=model.config.latent_scale,
                     image_size=size)
    extra = f" and {len(classes)}-class labels" if classes else ""
    if args.json:
        print(json.dumps({"out": str(out), "latents": list(z.shape), "normalized": not args.raw,
                          "classes": classes}))
    else:
        print(f"wrote {tuple(z.shape)} latents{extra} to {out}")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    """decode a latents .safetensors file to PNG images

    Reads tensor 'latents' written by `dmvae encode` (or any (N, C, h, w) tensor under --key) and
    writes one PNG per latent, named after the encoded files (sanitised: base names only) or
    numbered.
    """
    import torch
    from tqdm.auto import tqdm

    from dmvae.image import save_image, tensor_to_pil
    from dmvae.latent_files import load_latents

    found = load_latents(args.latents, key=args.key)
    z, files = found.latents, found.files
    normalized = False if args.raw else found.normalized
    taken: set[str] = set()
    names = [_unique(_safe_stem(files[i] if files else f"{i:06d}", i), taken) + ".png" for i in range(len(z))]
    out = check_output_files(args.out, names, overwrite=args.overwrite)
    model = load_autoencoder(args)
    out.mkdir(parents=True, exist_ok=True)
    index = 0
    with torch.no_grad(), tqdm(total=len(z), desc="decode", unit="img", disable=args.quiet) as bar:
        for start in range(0, len(z), args.batch_size):
            chunk = z[start : start + args.batch_size]
            for img in tensor_to_pil(model.decode(chunk, normalize=normalized).cpu()):
                target = out / names[index]
                with writing(target):
                    save_image(img, target)
                index += 1
            bar.update(len(chunk))
    if args.json:
        print(json.dumps({"out": str(out), "images": [str(out / n) for n in names]}))
    else:
        print(f"wrote {index} images to {out}")
    return 0
