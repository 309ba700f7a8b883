"""Per-image fidelity metrics: PSNR and SSIM on [-1, 1] floats or uint8 images.

Both metrics follow scikit-image exactly, so numbers in papers that used
``skimage.metrics`` can be compared with ours:

* :func:`psnr` equals ``skimage.metrics.peak_signal_noise_ratio(x, y, data_range=R)``,
  i.e. ``10 log10(R^2 / MSE)`` per image, computed in float64.
* :func:`ssim` equals ``skimage.metrics.structural_similarity(x, y, channel_axis=-1,
  data_range=R, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: the
  Gaussian-window form of Wang et al. (2004), 11x11 window (sigma 1.5, truncated at 3.5 sigma),
  K1 = 0.01, K2 = 0.03, population covariances, the SSIM map averaged over the pixels whose
  window lies fully inside the image, then over channels.

Input conventions (the same for both): a tensor of shape (B, C, H, W) or (C, H, W); ``uint8``
images use the range [0, 255] (data range R = 255); floating-point images use the library-wide
range [-1, 1] and are mapped to [0, 1] first (R = 1). The mapping matters for SSIM, whose constants
make it depend on the offset of the pixel range: with it, a float image and its uint8 rounding
give the same numbers as skimage on [0, 1] floats or on uint8 (the usual convention of tokenizer
papers). Floats are clamped to [-1, 1] by default because that is what a saved image contains;
the reference implementation computed PSNR on unclamped decoder outputs (``clamp=False``).
"""

from __future__ import annotations

import torch
from einops import rearrange

from dmvae.image import to_uint8  # the one float -> uint8 conversion, re-exported here

__all__ = ["psnr", "ssim", "to_uint8", "uint8_to_float"]

# Wang et al. 2004 constants, as in skimage.
_K1 = 0.01
_K2 = 0.03
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 [0, 255] to float32 [-1, 1] (``x / 127.5 - 1``); floats are returned unchanged."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"expected a float image tensor in [-1, 1] or uint8, got dtype {images.dtype}")
    return images


def _prepare_pair(
    x: torch.Tensor, y: torch.Tensor, clamp: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validate a pair of images; float64 (B, C, H, W) copies in [0, 255] or [0, 1], and R."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} expects two torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape:
        raise ValueError(
            f"{name}: images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name} expects (B, C, H, W) or (C, H, W) images, got shape {tuple(x.shape)}")
    if (x.dtype == torch.uint8) != (y.dtype == torch.uint8):
        raise TypeError(
            f"{name}: both images must be uint8 or both floating point, got {x.dtype} and {y.dtype}"
        )
    if x.dtype == torch.uint8:
        return x.double(), y.double(), 255.0
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"{name} expects uint8 or floating-point images, got {x.dtype} and {y.dtype}")
    for which, t in (("x", x), ("y", y)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: {which} holds NaN or infinite values")
        if clamp and t.numel() and float(t.abs().max()) > 3.0:  # [0, 255] floats would be clamped to ~1
            raise ValueError(f"{name}: float image {which} has values up to {float(t.abs().max()):.4g}; expected "
                             "[-1, 1] floats (pass [0, 255] images as uint8, or x / 127.5 - 1)")
    if clamp:
        x, y = x.clamp(-1, 1), y.clamp(-1, 1)
    return (x.double() + 1) / 2, (y.double() + 1) / 2, 1.0


def psnr(x: torch.Tensor, y: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(R^2 / MSE)`` in dB, as float64 of shape (B,).

    Args:
        x, y: images, (B, C, H, W) or (C, H, W); both uint8 ([0, 255]) or both float ([-1, 1]).
        clamp: clamp float inputs to [-1, 1] first (what a saved image holds). False = the
            reference's PSNR on raw decoder outputs.

    Identical images give ``inf``. Average over a data set with ``psnr(...).mean()`` (the mean of
    per-image PSNRs, the convention of tokenizer papers), not the PSNR of the mean MSE.
    """
    xd, yd, r = _prepare_pair(x, y, clamp, "psnr")
    mse = (xd - yd).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(r * r / mse)


def _gaussian_kernel1d(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter`` (radius int(truncate*sigma+0.5))."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Structural similarity per image (Gaussian window, sigma 1.5), float64 of shape (B,).

    Same input conventions as :func:`psnr`. Equals ``skimage.metrics.structural_similarity`` with
    ``channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False`` on the
    same (H, W, C) image in uint8 (``data_range=255``) or in [0, 1] (``data_range=1``).
    skimage filters the whole image with 'reflect' padding and then crops a border of
    ``radius`` = 5 pixels before averaging; the cropped pixels are exactly those whose window
    needs padding, so a 'valid' filter gives the same numbers with no padding at all.
    """
    xd, yd, r = _prepare_pair(x, y, clamp, "ssim")
    b, c, h, w = xd.shape
    kernel = _gaussian_kernel1d(_SSIM_SIGMA, _SSIM_TRUNCATE, xd.device)  # (11,)
    win = kernel.numel()
    if h < win or w < win:
        raise ValueError(f"ssim needs images of at least {win}x{win} pixels, got {h}x{w}")

    # Separable Gaussian filter of the five moment maps as a weighted sum of shifted views
    # ('valid' correlation, one axis at a time): float64 grouped convolutions are ~100x slower on CPU.
    maps = torch.cat([xd, yd, xd * xd, yd * yd, xd * yd], dim=1)  # (B, 5C, H, W)
    hv, wv = h - win + 1, w - win + 1
    maps = sum(kernel[k] * maps[:, :, k : k + hv, :] for k in range(win))  # (B, 5C, H-10, W)
    maps = sum(kernel[k] * maps[:, :, :, k : k + wv] for k in range(win))  # (B, 5C, H-10, W-10)
    ux, uy, uxx, uyy, uxy = rearrange(maps, "b (m c) h w -> m b c h w", m=5)

    c1 = (_K1 * r) ** 2
    c2 = (_K2 * r) ** 2
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)  # per channel, then over channels: (B,)
