"""The Flux-style convolutional pixel decoder of DMVAE.

Architecture (upstream digest §1 "Decoder", §8 item 4): the latent grid (B, z, h, w) is upsampled
x2 by a nearest + 3x3 conv stem (the reference's ``post_init`` replacement of ``conv_in``), lifted to
``ch * ch_mult[-1]`` channels, passed through a mid block (ResNet -> single-head attention ->
ResNet), then through ``len(ch_mult)`` up levels (stored as ``up.0`` .. ``up.{L-1}``, run from the
last to the first), each with ``num_res_blocks + 1`` ResNet blocks and, except for level 0, a
nearest x2 + 3x3 conv upsample. Total upsampling factor: ``2 * 2 ** (L - 1) = 2 ** L`` (16 for the
release's 4 levels, i.e. one pixel patch per latent position). The output is the raw ``conv_out``
result: no tanh, no clamp (values outside [-1, 1] are normal).

Module and parameter names are those of the reference state dict (``conv_in.0.conv``, ``conv_in.1``,
``mid.block_1``, ``mid.attn_1``, ``up.{i}.block.{j}``, ``nin_shortcut``, ``up.{i}.upsample.conv``,
``norm_out``, ``conv_out``), so a reference checkpoint loads with ``strict=True`` without renaming.
Nothing here depends on the grid size: any (h, w) works.

Memory format (``FluxDecoder.set_memory_format``): by default the decoder runs in contiguous NCHW,
which keeps it within ~6e-6 of the reference on the golden fixtures. ``torch.channels_last``
(NHWC) lets oneDNN / cuDNN skip the layout reorders around every convolution (measured ~1.3x
faster on CPU, and the layout tensor cores want on GPU) at the price of a different summation
order in conv / GroupNorm (~4e-5 from the fixtures on CPU, inside the 1e-4 the fast path is held
to). The output is returned as contiguous NCHW either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["FluxDecoder", "ResnetBlock", "AttnBlock", "Upsample"]


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups, eps 1e-6, affine: the Flux / LDM decoder convention.
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus a skip (1x1 ``nin_shortcut`` when the
    channel count changes). No dropout, no time embedding."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C_in, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)  # (B, C_out, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv q/k/v/proj_out and a
    residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W)
        height, width = x.shape[-2:]
        h = self.norm(x)
        # (B, 1, H*W, C): one head, positions in row-major order
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale 1/sqrt(C)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (same channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FluxDecoder(nn.Module):
    """Latent grid (B, z_channels, h, w) -> image (B, out_channels, h * 2**L, w * 2**L).

    Args:
        z_channels: latent channels (32 for the release ``dmvae-l``).
        channels: base width ``ch``; level ``i`` has ``ch * channel_mult[i]`` channels.
        channel_mult: per-level width multipliers; ``len(channel_mult)`` = L levels.
        num_res_blocks: ResNet blocks per level is ``num_res_blocks + 1`` (the Flux convention).
        out_channels: image channels (3).
    """

    def __init__(
        self,
        z_channels: int,
        channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        self.z_channels = z_channels
        self.num_resolutions = len(channel_mult)
        self.num_res_blocks = num_res_blocks
        block_in = channels * channel_mult[-1]

        # The reference's post_init stem: nearest x2 + conv3 (z -> z), then conv3 (z -> block_in).
        self.conv_in = nn.Sequential(
            Upsample(z_channels),
            nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1),
        )

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)

        # Levels are built from the deepest (L-1) to 0 and stored by index, so ``up.0`` is the
        # full-resolution level; the empty ``attn`` lists of the reference hold no parameters and
        # are omitted.
        up: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = channels * channel_mult[i_level]
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level = nn.Module()
            level.block = blocks
            if i_level != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)

        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)
        # Layout of the activations (see the module docstring); not part of the state dict.
        self.memory_format: torch.memory_format = torch.contiguous_format

    def set_memory_format(self, memory_format: torch.memory_format) -> FluxDecoder:
        """Run the convolutions in ``torch.contiguous_format`` (NCHW, default, closest to the
        reference) or ``torch.channels_last`` (NHWC, faster); converts the weights in place."""
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(
                f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}"
            )
        self.to(memory_format=memory_format)
        self.memory_format = memory_format
        return self

    @property
    def upsampling_factor(self) -> int:
        """Output pixels per latent position along each axis (``2 ** L``)."""
        return 2**self.num_resolutions

    def forward(self, z: Tensor) -> Tensor:  # z: (B, z, h, w)
        # one explicit layout for the whole network: a strided view (e.g. a rearranged token
        # grid) would otherwise pick the conv kernels by accident
        z = z.contiguous(memory_format=self.memory_format)
        h = self.conv_in(z)  # (B, ch*mult[-1], 2h, 2w)
        h = self.mid.block_1(h)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h)  # (B, ch*mult[-1], 2h, 2w)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for block in level.block:
                h = block(h)  # (B, ch*mult[i_level], ., .)
            if i_level != 0:
                h = level.upsample(h)  # spatial x2
        h = F.silu(self.norm_out(h))  # (B, ch*mult[0], 2**L h, 2**L w)
        return self.conv_out(h).contiguous()  # (B, out_channels, 2**L h, 2**L w), unbounded, NCHW
