"""Tiled decoding: decode a large latent grid in overlapping tiles and blend them.

The decoder's activation memory grows with the area it decodes at once (about
``channels x H x W`` floats per layer at full resolution, plus the mid-block attention over
``(h w)^2`` latent pairs). Decoding tiles of ``tile x tile`` latents bounds that peak by the tile
area instead of the image area, at the cost of an approximation near tile borders:

    for each tile origin (y0, x0) on a grid with stride ``tile - overlap`` (the last tile flush
    with the border):   out[tile] += w * decode(z[tile]),   weight[tile] += w
    result = out / weight

``w`` is a separable ramp that rises linearly across each overlap a tile shares with a
neighbour (and is flat at the image border), so overlaps are convex blends of the two decodes
and the seams are invisible where the tiles agree. Only the decoder is tiled: the ViT encoder
attends globally and tiling it would change the latents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dmvae.checks import check_int

__all__ = ["tile_starts", "tiled_decode"]


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Origins of tiles of ``tile`` covering ``[0, size)`` with the given stride; the last tile
    ends exactly at ``size`` (tiles never hang over the border)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(n: int, overlap: int, rise: bool, fall: bool, device: torch.device) -> Tensor:
    """(n,) blending weights: linear from ~0 to 1 over the first ``overlap`` entries when
    ``rise``, from 1 to ~0 over the last ``overlap`` when ``fall``, 1 elsewhere."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        up = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if rise:
            w[:overlap] = torch.minimum(w[:overlap], up)
        if fall:
            w[n - overlap :] = torch.minimum(w[n - overlap :], up.flip(0))
    return w


def tiled_decode(
    decode: Callable[[Tensor], Tensor],
    latents: Tensor,
    *,
    tile: int,
    overlap: int,
    scale: int,
    context: int = 0,
) -> Tensor:
    """Decode ``latents`` (B, C, h, w) in overlapping ``tile x tile`` latent tiles.

    Args:
        decode: latent tile (B, C, t, t') -> image tile (B, 3, t*scale, t'*scale).
        tile: tile side in latent positions; a grid no larger than a tile is decoded whole.
        overlap: latent positions shared by neighbouring tiles (0 <= overlap < tile).
        scale: pixels per latent position (the decoder's upsampling factor).
        context: extra latent positions decoded around each tile (clipped at the border) and
            then discarded, so the kept pixels see more of their neighbourhood (convolution
            receptive field, GroupNorm statistics). Costs ``((tile + 2 context) / tile)^2`` compute.

    Returns (B, 3, h*scale, w*scale) float32.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    context = check_int("context", context, 0)
    b, _, h, w = latents.shape
    if h <= tile and w <= tile:
        return decode(latents)
    stride = tile - overlap
    ys, xs = tile_starts(h, tile, stride), tile_starts(w, tile, stride)
    out = torch.zeros(b, 3, h * scale, w * scale, device=latents.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, h * scale, w * scale, device=latents.device, dtype=torch.float32)
    po = overlap * scale
    wxs = [_ramp(min(tile, w - x0) * scale, po, rise=x0 > 0, fall=x0 + tile < w, device=latents.device)
           for x0 in xs]  # the column ramps, computed once for every row of tiles
    for y0 in ys:
        th = min(tile, h - y0)
        wy = _ramp(th * scale, po, rise=y0 > 0, fall=y0 + th < h, device=latents.device)
        for x0, wx in zip(xs, wxs):
            tw = min(tile, w - x0)
            ya, xa = max(0, y0 - context), max(0, x0 - context)
            window = latents[:, :, ya : min(h, y0 + th + context), xa : min(w, x0 + tw + context)]
            piece = decode(window).float()[  # (B, 3, th*s, tw*s) once the context is cut off
                :, :, (y0 - ya) * scale : (y0 - ya + th) * scale, (x0 - xa) * scale : (x0 - xa + tw) * scale
            ]
            wgt = wy[:, None] * wx[None, :]
            ys_, xs_ = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
            out[:, :, ys_, xs_] += piece * wgt
            weight[:, :, ys_, xs_] += wgt
    return out / weight
