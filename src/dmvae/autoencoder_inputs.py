"""Input validation and latent layouts of the :class:`~dmvae.autoencoder.DMVAE` autoencoder.

Every bad input gets an error naming what was expected and what arrived: the type, the layout
((B, 3, H, W) images in [-1, 1]; (B, z, h, w) latent grids or (B, N, z) tokens), the size (multiples
of the patch size, at least one patch / one latent position), the device (no meta tensors).
An empty batch (B = 0) is valid for both encode and decode and gives an empty result.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["INPUT_RANGE_LIMIT", "as_image_batch", "check_images", "check_latents", "grid_to_tokens", "tokens_to_grid"]

# Inputs whose values leave [-INPUT_RANGE_LIMIT, INPUT_RANGE_LIMIT] are rejected: they are almost
# certainly [0, 255] images (or unnormalised data), not [-1, 1] images with a little overshoot.
INPUT_RANGE_LIMIT = 1.5


def tokens_to_grid(tokens: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
    """(B, N, C) reference token layout -> (B, C, h, w) grid, row-major (``b (h w) c -> b c h w``).
    Without ``height``/``width`` the grid must be square."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, N, C), got {tuple(tokens.shape)}")
    n = tokens.shape[1]
    if height is None and width is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{n} tokens do not form a square grid; pass height= and width= explicitly"
            )
        height = width = side
    elif height is None or width is None:
        height = height if height is not None else n // width  # type: ignore[operator]
        width = width if width is not None else n // height
    if height * width != n:
        raise ValueError(f"a {height}x{width} grid needs {height * width} tokens, got {n}")
    return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width).contiguous()


def grid_to_tokens(grid: Tensor) -> Tensor:
    """(B, C, h, w) grid -> (B, h*w, C) tokens, row-major (the reference's layout)."""
    if grid.ndim != 4:
        raise ValueError(f"expected a latent grid of shape (B, C, h, w), got {tuple(grid.shape)}")
    return rearrange(grid, "b c h w -> b (h w) c")


def _check_data(x: Tensor, what: str) -> None:
    if x.is_meta:
        raise ValueError(f"{what} are on the meta device (shape {tuple(x.shape)}, no data); "
                         "materialise them (e.g. .to_empty(device=...) and fill) before calling the model")
    if x.is_complex():
        raise TypeError(f"expected real-valued {what}, got complex dtype {x.dtype}")


def check_images(images: Any, patch_size: int, *, check_range: bool = True) -> Tensor:
    """``images`` if they are a float (B, 3, H, W) tensor with H, W positive multiples of
    ``patch_size`` (and, with ``check_range``, values in [-1.5, 1.5]); else a clear error."""
    if not isinstance(images, Tensor):
        raise TypeError(
            f"expected images as a torch.Tensor of shape (B, 3, H, W) in [-1, 1], got "
            f"{type(images).__name__} (use dmvae.image.pil_to_tensor for PIL/numpy images)"
        )
    if images.ndim != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
        raise ValueError(
            f"expected images of shape (B, 3, H, W), got a {images.ndim}-D tensor of shape "
            f"{tuple(images.shape)}{hint}"
        )
    if images.shape[1] != 3:
        hint = (
            " (channels-last? use images.permute(0, 3, 1, 2))" if images.shape[-1] == 3 else ""
        )
        raise ValueError(
            f"expected 3 image channels at dim 1, (B, 3, H, W), got shape {tuple(images.shape)}{hint}"
        )
    _check_data(images, "images")
    if not images.is_floating_point():
        raise TypeError(
            f"expected floating-point images in [-1, 1], got dtype {images.dtype} "
            "(for uint8 images use images.float() / 127.5 - 1, or dmvae.image.pil_to_tensor)"
        )
    height, width = images.shape[-2:]
    p = patch_size
    if height < p or width < p:
        raise ValueError(
            f"images of {height}x{width} pixels are smaller than one patch ({p}x{p}): expected "
            f"(B, 3, H, W) with H and W positive multiples of {p}"
        )
    if height % p or width % p:
        raise ValueError(
            f"image height and width must be multiples of the patch size {p}, got {height}x{width} "
            f"(crop or resize, e.g. to {max(p, height // p * p)}x{max(p, width // p * p)}; "
            "dmvae.image.center_crop_arr does ADM's centre crop)"
        )
    if check_range and images.numel() > 0:
        lo, hi = (v.item() for v in torch.aminmax(images.detach()))
        if not (lo >= -INPUT_RANGE_LIMIT and hi <= INPUT_RANGE_LIMIT):
            hint = (
                "non-finite values (NaN/inf) in the input"
                if not (math.isfinite(lo) and math.isfinite(hi))
                else "[0, 255] images? use x / 127.5 - 1"
                if hi > 2.0
                else "images must be scaled to [-1, 1] ([0, 1] images: use 2 * x - 1)"
            )
            raise ValueError(
                f"expected images in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]: {hint}. "
                "(Set model.check_input_range = False to skip this check.)"
            )
        if lo >= 0.0 and images[0].numel() >= 3 * 8 * 8:
            # The common slip: torchvision's ToTensor gives [0, 1]. A real [-1, 1] batch with no
            # pixel channel below mid-grey is rare, so this warns rather than refuses.
            warnings.warn(
                f"images look like [0, 1] (values in [{lo:.3g}, {hi:.3g}], none negative) but the model "
                "expects [-1, 1]: use 2 * x - 1 (ToTensor output) or dmvae.image.pil_to_tensor. "
                "(Set model.check_input_range = False to silence this.)",
                UserWarning,
                stacklevel=3,
            )
    return images


def check_latents(latents: Any, z_channels: int) -> Tensor:
    """A float (B, z, h, w) latent grid (h, w >= 1) from a grid or the reference's square token
    layout (B, h*w, z); else a clear error."""
    if not isinstance(latents, Tensor):
        raise TypeError(
            f"expected latents as a torch.Tensor of shape (B, {z_channels}, h, w), "
            f"got {type(latents).__name__}"
        )
    _check_data(latents, "latents")
    if not latents.is_floating_point():
        raise TypeError(f"expected floating-point latents, got dtype {latents.dtype}")
    z = z_channels
    if latents.ndim == 3:  # the reference's token layout (B, N, z) with a square grid
        if latents.shape[-1] != z:
            raise ValueError(
                f"expected latent tokens of shape (B, N, {z}), got {tuple(latents.shape)}"
            )
        if latents.shape[1] == 0:
            raise ValueError(f"expected at least one latent token, got shape {tuple(latents.shape)}")
        return tokens_to_grid(latents)
    if latents.ndim != 4:
        raise ValueError(
            f"expected latents of shape (B, {z}, h, w) (or tokens (B, N, {z})), got a "
            f"{latents.ndim}-D tensor of shape {tuple(latents.shape)}"
        )
    if latents.shape[1] != z:
        raise ValueError(
            f"expected {z} latent channels at dim 1, (B, {z}, h, w), got shape {tuple(latents.shape)}"
        )
    if latents.shape[2] < 1 or latents.shape[3] < 1:
        raise ValueError(f"expected a latent grid of at least 1x1, got shape {tuple(latents.shape)}")
    return latents


def as_image_batch(images: Any, size: int) -> tuple[Tensor, bool]:
    """``(images (B, 3, H, W) float in [-1, 1], were_tensors)`` from any of: PIL image(s), image
    file path(s), uint8 (H, W, 3) / (B, H, W, 3) arrays (each ADM-centre-cropped to ``size``), or a
    float tensor (B, 3, H, W) / (3, H, W) in [-1, 1] (used as is)."""
    from dmvae.image import load_image, pil_to_tensor

    if isinstance(images, Tensor):
        return (images.unsqueeze(0) if images.ndim == 3 else images), True
    items = [images] if isinstance(images, (str, os.PathLike)) else images
    if isinstance(items, Sequence) and not isinstance(items, (str, bytes)):
        if not items:
            raise ValueError("expected at least one image, got an empty sequence")
        items = [load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in items]
    return pil_to_tensor(items, size=size), False


