"""Building blocks of the LightningDiT latent diffusion transformer.

Every module here keeps the parameter / buffer names of the reference LightningDiT so that the
released checkpoints load with ``strict=True`` (see ``docs/latent_dit.md``):

* :class:`RMSNorm` (``weight``), computed in float32 and cast back;
* :class:`VisionRoPE` (persistent buffers ``freqs_cos`` / ``freqs_sin``), EVA-style 2-D rotary
  embedding with interleaved pairs, row angles then column angles;
* :class:`Attention` (``qkv``, ``q_norm``, ``k_norm``, ``proj``) with QK-norm and RoPE;
* :class:`SwiGLU` (``w12``, ``w3``) and :class:`Mlp` (``fc1``, ``fc2``);
* :class:`PatchEmbed` (``proj``), :class:`TimestepEmbedder` (``mlp.0``, ``mlp.2``),
  :class:`LabelEmbedder` (``embedding_table``);
* :func:`modulate` (adaLN) and :func:`sincos_pos_embed_2d` (fixed MAE position embedding).

Nothing in the block path branches on tensor *values*, so ``torch.compile(fullgraph=True)`` traces
a block without graph breaks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

__all__ = [
    "Attention",
    "FrozenModule",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "SwiGLU",
    "TimestepEmbedder",
    "VisionRoPE",
    "modulate",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]


# ------------------------------------------------------------------------------------------------
# fixed networks
# ------------------------------------------------------------------------------------------------


class FrozenModule(nn.Module):
    """A fixed network (a metric such as LPIPS or the FID Inception): ``__init__`` ends with
    :meth:`freeze`; from then on nothing requires grad and the module stays in eval mode, whatever
    ``train()`` a parent module calls (BatchNorm never switches to batch statistics)."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


# ------------------------------------------------------------------------------------------------
# normalisation and modulation
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain: ``x / sqrt(mean(x^2) + eps) * weight``.

    The normalisation runs in float32 and is cast back to the input dtype before the gain is applied
    (as the reference does; it keeps bf16 training stable).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; x (B, N, D), shift/scale (B, D).

    ``shift=None`` is the reference's ``wo_shift`` variant (scale only).
    """
    out = x * (1 + scale.unsqueeze(1))
    if shift is None:
        return out
    return out + shift.unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# position embeddings
# ------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) float64 positions -> (M, dim) as [sin, cos], omega_k = 1e4^(-k / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed MAE-style 2-D sin-cos embedding, (grid_size**2, dim) float32, row-major tokens.

    Computed in float64 like the reference (numpy) and cast to float32. The first half of the
    channels encodes the column (w) index, the second half the row (h) index, because the reference
    builds its grid with ``meshgrid(w, h)``.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)  # (G*G, dim)
    return emb.float()


class VisionRoPE(nn.Module):
    """EVA-02 ``VisionRotaryEmbeddingFast``: 2-D rotary embedding over a square token grid.

    ``dim`` is half the head dimension. ``dim/2`` frequencies ``1e4^(-2k/dim)`` are evaluated at grid
    positions and repeated in interleaved pairs; the row (h) angles are concatenated with the column
    (w) angles, giving tables of shape (grid**2, 2*dim) = (N, head_dim). The tables are persistent
    buffers (``freqs_cos`` / ``freqs_sin``) because the released checkpoints contain them.
    """

    def __init__(self, dim: int, grid_size: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RoPE needs an even dim (head_dim / 2), got {dim}")
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))  # (dim/2,)
        # positions arange(n) / n * n, exactly as the reference computes them (ft_seq_len = pt_seq_len)
        pos = torch.arange(grid_size) / grid_size * grid_size  # (G,)
        freqs = pos[:, None] * freqs[None]  # (G, dim/2)
        freqs = repeat(freqs, "g n -> g (n r)", r=2)  # (G, dim) interleaved pairs
        g = grid_size
        table = torch.cat(
            [
                repeat(freqs, "h d -> h w d", w=g),  # row angles
                repeat(freqs, "w d -> h w d", h=g),  # column angles
            ],
            dim=-1,
        )  # (G, G, 2*dim)
        table = rearrange(table, "h w d -> (h w) d")
        self.register_buffer("freqs_cos", table.cos(), persistent=True)
        self.register_buffer("freqs_sin", table.sin(), persistent=True)

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        """Each interleaved pair (a, b) -> (-b, a)."""
        x = rearrange(x, "... (d r) -> ... d r", r=2)
        a, b = x.unbind(-1)
        return rearrange(torch.stack((-b, a), dim=-1), "... d r -> ... (d r)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, heads, N, head_dim); tables (N, head_dim) broadcast over batch and heads
        return x * self.freqs_cos + self.rotate_half(x) * self.freqs_sin


# ------------------------------------------------------------------------------------------------
# attention and feed-forward
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm and RoPE (SDPA with the default scale).

    QK-norm uses :class:`RMSNorm` when ``use_rmsnorm`` else an affine ``nn.LayerNorm(head_dim)``
    (torch default eps 1e-5), mirroring the reference's choice of norm layer.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 use_rmsnorm: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        norm: type[nn.Module] = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRoPE | None = None) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, N, 3D)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, h, N, d)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, D)
        return self.proj(out)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)  # (B, N, hidden) each
        return self.w3(F.silu(a) * b)


class Mlp(nn.Module):
    """Standard two-layer MLP with tanh-approximated GELU (DiT's ``approx_gelu``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ------------------------------------------------------------------------------------------------
# input embedders
# ------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: conv(p, stride p) then (B, D, h, w) -> (B, h*w, D)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw t (no x1000), laid out ``[cos(t f), sin(t f)]``; (B,) -> (B, dim).

    ``f_i = exp(-ln(max_period) * i / (dim/2))``. The cos-first order is the reference's and matters
    for checkpoint compatibility.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, hidden): sinusoidal features, Linear, SiLU, Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.freq_dim)  # (B, freq_dim) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, hidden), with a null class (id ``num_classes``) for classifier-free
    guidance when ``dropout_prob > 0`` (the table then has ``num_classes + 1`` rows).

    Labels are replaced by the null id where ``force_drop_ids`` is true (any mode) or, in training
    mode without ``force_drop_ids``, with probability ``dropout_prob`` (``torch.rand(B) < p``, the
    reference's draw).
    """

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden)

    def drop_labels(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if force_drop_ids is not None:
            if not self.has_null:
                raise ValueError("label dropout needs a null class, but class_dropout_prob == 0")
            drop = torch.as_tensor(force_drop_ids, device=labels.device).bool()
            if drop.shape != labels.shape:
                raise ValueError(
                    f"force_drop_ids must have the labels' shape {tuple(labels.shape)}, got "
                    f"{tuple(drop.shape)}"
                )
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return labels
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.embedding_table(self.drop_labels(labels, train, force_drop_ids))
