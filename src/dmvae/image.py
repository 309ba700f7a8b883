"""PIL / numpy <-> tensor helpers with the conventions of DMVAE and ADM.

- Model images are float (B, 3, H, W) in [-1, 1]: ``x = uint8 / 127.5 - 1``.
- Back to 8 bits as the reference (and ADM / DiT sampling scripts) do:
  ``uint8 = trunc(clamp(127.5 * x + 128, 0, 255))``, i.e. ``127.5 x + 127.5`` rounded half-up,
  so ``uint8 -> x -> uint8`` is the identity.
- :func:`center_crop_arr` is ADM's (guided-diffusion) ImageNet preprocessing, which the
  reference's training/evaluation data pipeline uses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["load_image", "center_crop_arr", "pil_to_tensor", "tensor_to_pil", "to_uint8_numpy"]

ImageLike = Union[Image.Image, np.ndarray]


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open a local image file as an RGB PIL image (fully read; the file is closed).

    URLs are rejected on purpose: dmvae never fetches images over the network.
    """
    text = str(path)
    if "://" in text:
        raise ValueError(f"load_image takes a local file path, got a URL {text!r}; download it first")
    p = Path(os.path.expanduser(text))
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        with Image.open(p) as img:
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"could not read {p} as an image: {e}") from e


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX filtering while the short side is >= 2 * image_size,
    BICUBIC-resize so the short side equals ``image_size``, then crop the centre square."""
    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(pil_image).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _to_uint8_hwc(image: ImageLike, size: int | None) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise TypeError(
                f"numpy images must be uint8 arrays of shape (H, W, 3), got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected PIL images or uint8 numpy arrays, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if size is not None:
        image = center_crop_arr(image, size)
    return np.asarray(image, dtype=np.uint8)


def pil_to_tensor(
    images: ImageLike | Sequence[ImageLike], size: int | None = None
) -> Tensor:
    """PIL image(s) or uint8 (H, W, 3) / (B, H, W, 3) arrays -> float32 (B, 3, H, W) in [-1, 1].

    Args:
        images: one image or a sequence of images (converted to RGB).
        size: if given, each image is ADM-centre-cropped to ``size x size`` first; otherwise all
            images must already share one size.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or len(images) == 0:
        raise TypeError(
            f"expected a PIL image or a non-empty sequence of images, got {type(images).__name__}"
        )
    arrays = [_to_uint8_hwc(img, size) for img in images]
    shapes = sorted({a.shape[:2] for a in arrays})
    if len(shapes) > 1:
        raise ValueError(
            f"images have different sizes (H, W) {shapes}; pass size= to centre-crop them to one size"
        )
    batch = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3) uint8
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


def to_uint8_numpy(x: Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) images in [-1, 1] -> uint8 (B, H, W, 3).

    ``trunc(clamp(127.5 x + 128, 0, 255))``: the reference's conversion (round half-up of
    ``127.5 x + 127.5``); values outside [-1, 1] saturate.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images in [-1, 1], got dtype {x.dtype}")
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values; cannot convert to uint8")
    out = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # truncation = floor here
    return out.permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) images in [-1, 1] -> list of RGB PIL images (see
    :func:`to_uint8_numpy` for the rounding)."""
    return [Image.fromarray(a) for a in to_uint8_numpy(x)]
