"""LatentDiT: the LightningDiT latent diffusion transformer, compatible with the released checkpoints.

The network predicts the flow-matching velocity ``v = x1 - x0`` of the linear path
``x_t = t * x1 + (1 - t) * x0`` with **t = 1 at the data and t = 0 at the noise** (the reference's
convention, the reverse of the paper's; see :mod:`dmvae.transport`). It is used three times in
DMVAE: as the frozen "real" score model, as the trainable "fake" score model of the
distribution-matching loss, and as the downstream class-conditional generator.

Architecture (reference ``LightningDiT``): patch embedding, fixed 2-D sin-cos position embedding
*plus* 2-D RoPE, ``depth`` adaLN-Zero blocks (RMSNorm, QK-RMSNorm attention, SwiGLU), an adaLN final
layer and unpatchify. Conditioning ``c = t_emb(t) + y_emb(y)`` with t in [0, 1] used as is.

The configuration and its presets are :mod:`dmvae.dit_config`. Quickstart::

    from dmvae import LatentDiT, create_model
    model = create_model("LightningDiT-XL/1", input_size=16, in_channels=32)
    model = LatentDiT.from_pretrained("ep800.pt", config="LightningDiT-XL/1")  # EMA weights
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from dmvae._registry import MODEL_CLASSES
from dmvae.convert import DIT, ReferenceLayout
from dmvae.dit_config import LatentDiTConfig
from dmvae.hub import HubMixin
from dmvae.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    VisionRoPE,
    modulate,
    sincos_pos_embed_2d,
)
from dmvae.transport import apply_guidance, batch_time, guidance_null_label

__all__ = ["LatentDiT", "LatentDiTConfig"]


# ################################################################################################
#                                          core model
# ################################################################################################


def _norm(cfg: LatentDiTConfig) -> nn.Module:
    """The pre-modulation norm of the blocks and the final layer: RMSNorm, or LayerNorm without
    affine parameters (eps 1e-6)."""
    h = cfg.hidden_size
    return RMSNorm(h) if cfg.use_rmsnorm else nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)


class LatentDiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``x += g * attn(mod(norm1 x)); x += g * mlp(mod(norm2 x))``."""

    def __init__(self, cfg: LatentDiTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.norm1 = _norm(cfg)
        self.norm2 = _norm(cfg)
        self.attn = Attention(h, cfg.num_heads, qkv_bias=True, qk_norm=cfg.use_qknorm,
                              use_rmsnorm=cfg.use_rmsnorm)
        self.mlp: nn.Module = SwiGLU(h, cfg.mlp_hidden) if cfg.use_swiglu else Mlp(h, cfg.mlp_hidden)
        self.wo_shift = cfg.wo_shift
        n_mod = 4 if cfg.wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, n_mod * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRoPE | None) -> torch.Tensor:
        # x (B, N, D), c (B, D)
        mod = self.adaLN_modulation(c)  # (B, 4D or 6D)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, N, D)


class FinalLayer(nn.Module):
    """norm -> adaLN (shift, scale) -> linear to p*p*out_channels per token."""

    def __init__(self, cfg: LatentDiTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.norm_final = _norm(cfg)
        self.linear = nn.Linear(h, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)


class LatentDiT(nn.Module, HubMixin):
    """LightningDiT velocity model ``v(x_t, t, y)`` over latents (B, C, H, W).

    ``forward(x, t, y)``: ``x`` (B, in_channels, input_size, input_size), ``t`` (B,) or scalar in
    [0, 1] (t = 1 is data), ``y`` (B,) int labels in [0, num_classes] (``num_classes`` is the null
    class), or None for an unconditional model (``num_classes=0``: no label table, ``c = t_emb``). Returns the velocity, same shape as ``x``. In train mode labels are dropped to the null
    class with probability ``class_dropout_prob`` (pass ``force_drop_ids`` to choose which).
    """

    config_class: ClassVar[type] = LatentDiTConfig
    _reference_filenames: ClassVar[tuple[str, ...]] = ("ep800.pt", "ep400.pt", "ep64.pt")
    # EMA weights by default: the released generators are sampled with them (dmvae.convert)
    _reference_layout: ClassVar[ReferenceLayout] = DIT
    _default_use_ema: ClassVar[bool] = DIT.default_use_ema
    # the release checkpoints (ep*.pt on sen-ye/dmvae) ship without a config: XL/1, 16x16x32 latents
    _reference_default_config: ClassVar[str | None] = "LightningDiT-XL/1"

    def __init__(self, config: LatentDiTConfig | Mapping[str, Any] | str | None = None,
                 **overrides: Any) -> None:
        super().__init__()
        cfg = LatentDiTConfig() if config is None else self._resolve_config(config)
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        self.gradient_checkpointing = cfg.use_checkpoint

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        # an unconditional model (num_classes = 0) has no label table: c = t_emb(t)
        self.y_embedder = (LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
                           if cfg.num_classes else None)
        # fixed (not trained) but saved in the checkpoint, as in the reference
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, cfg.hidden_size),
                                      requires_grad=False)
        self.feat_rope = VisionRoPE(cfg.head_dim // 2, cfg.grid_size) if cfg.use_rope else None
        self.blocks = nn.ModuleList(LatentDiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    # ---- conveniences --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int | None:
        """Label id of the unconditional class, or None if the model has no null row (built with
        ``class_dropout_prob=0``, or unconditional with ``num_classes=0``)."""
        if self.y_embedder is None or not self.y_embedder.has_null:
            return None
        return self.config.num_classes

    def enable_gradient_checkpointing(self, enabled: bool = True) -> LatentDiT:
        """Recompute block activations in the backward pass (train mode only); saves memory."""
        self.gradient_checkpointing = enabled
        return self

    def disable_gradient_checkpointing(self) -> LatentDiT:
        return self.enable_gradient_checkpointing(False)

    def compile(  # type: ignore[override]
        self, *, regional: bool = True, fullgraph: bool = True, dynamic: bool | None = None, mode: str | None = None,
        backend: str = "inductor",
    ) -> LatentDiT:
        """``torch.compile`` in place (see ``docs/performance.md``); returns ``self``.

        ``regional=True`` (default) compiles the repeated :class:`LatentDiTBlock` only: the
        ``depth`` blocks share one graph, so compile time is that of one block, and every caller
        (``forward``, ``forward_with_cfg``, the samplers, the DM loss) runs the compiled blocks.
        The time reaches the blocks as the tensor ``c``: new timesteps never recompile.
        ``regional=False`` compiles the whole ``model(...)`` call (input checks skipped under
        compile); it fuses the embedders and the final layer too, and with
        ``mode="reduce-overhead"`` and a fixed batch it runs as a CUDA graph.
        ``fullgraph=True`` makes a graph break an error.
        """
        from dmvae._compile import compile_module, compile_repeated_blocks

        kw: dict[str, Any] = dict(fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend)
        if regional:
            compile_repeated_blocks(self, LatentDiTBlock, **kw)
        else:
            compile_module(self, **kw)
        return self

    # ---- init ----------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """All custom initialisation (reference LightningDiT / DiT):

        * every Linear: xavier-uniform weight, zero bias;
        * patch embedding: xavier-uniform on the flattened conv kernel, zero bias;
        * fixed 2-D sin-cos ``pos_embed``;
        * label table and timestep MLP: N(0, 0.02);
        * adaLN modulation of every block and of the final layer, and the final linear: zero
          (adaLN-Zero: every block starts as the identity and the model outputs 0).
        """
        if self.pos_embed.is_meta:  # built on the meta device to receive a checkpoint: no values
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        pe = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size)
        self.pos_embed.data.copy_(pe.unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---- input checks --------------------------------------------------------------------------
    def check_inputs(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None, check_time: bool = True,
        check_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shapes and dtypes always; with ``check_values`` also the values (t in [0, 1] and not NaN,
        labels in range), which reads tensors back to the host."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {got}")
        b, c, h, w = x.shape
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if (c, h, w) != expected:
            raise ValueError(
                f"x must be (B, {expected[0]}, {expected[1]}, {expected[2]}) for this LatentDiT "
                f"(in_channels={cfg.in_channels}, input_size={cfg.input_size}), got {tuple(x.shape)}"
            )
        t = batch_time(t, b, x.device, check=False)
        if check_values and (torch.isnan(t).any() or (check_time and ((t < 0).any() or (t > 1).any()))):
            raise ValueError(
                f"t must lie in [0, 1] (t = 0 noise, t = 1 data), got min {t.min().item():.4g}, "
                f"max {t.max().item():.4g}"
            )
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this LatentDiT is unconditional (num_classes=0): pass y=None")
            return t, None
        if y is None:
            raise ValueError(
                f"y is required: this LatentDiT is class-conditional ({cfg.num_classes} classes"
                + (f", null class {cfg.num_classes})" if self.y_embedder.has_null else ")")
            )
        y = torch.as_tensor(y, device=x.device)
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.shape != (b,):
            raise ValueError(f"y must have shape ({b},), got {tuple(y.shape)}")
        top = cfg.num_classes if self.y_embedder.has_null else cfg.num_classes - 1
        if check_values and b and ((y < 0).any() or (y > top).any()):
            null = f" ({cfg.num_classes} = null class)" if self.y_embedder.has_null else ""
            raise ValueError(
                f"labels must lie in [0, {top}]{null}, got min {y.min().item()}, max {y.max().item()}"
            )
        return t, y

    # ---- forward -------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W). With p = 1 the result is a view with NHWC strides, like
        the reference (it changes the summation order of later reductions by at most an ulp)."""
        p, g = self.config.patch_size, self.config.grid_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=p, q=p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor | None = None,
        *,
        force_drop_ids: torch.Tensor | None = None,
        check_time: bool = True,
        check_values: bool = True,
    ) -> torch.Tensor:
        """Velocity ``v(x_t, t, y)``; see the class docstring. ``force_drop_ids`` (B,) bool/int:
        rows to replace by the null class, in any mode (no random draw then). ``check_time=False``
        allows t outside [0, 1] (adaptive ODE solvers probe past t = 1 and interpolate back).
        ``check_values=False`` skips the checks that read t and y back to the host (a sampler
        validates once before its loop); shapes are always checked."""
        if not torch.compiler.is_compiling():
            t, y = self.check_inputs(x, t, y, check_time, check_values)
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=False)
            else:
                x = block(x, c, self.feat_rope)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        x = self.unpatchify(x)  # (B, C_out, H, W)
        if self.config.learn_sigma:
            x = x[:, : self.config.in_channels]
        return x

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor,
        cfg_scale: float,
        *,
        cfg_interval: tuple[float, float] | None = None,
        guidance_channels: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance on the reference's doubled batch.

        ``x`` (2B, ...) with ``y = [cond; null]``: only ``x[:B]`` is read (and duplicated), one
        forward runs on the doubled batch, and ``u + s * (c - u)`` is returned in BOTH halves.

        * ``guidance_channels=None`` guides every channel. An int ``k`` guides only channels ``[:k]``
          (``3`` is the reference's legacy default, a DiT quirk); the other channels pass through
          per row (conditional output in the first half, unconditional in the second).
        * ``cfg_interval=(lo, hi)``: guidance only where ``lo <= t <= hi`` (per conditional row);
          elsewhere both halves carry the conditional output. ``(start, 1.0)`` reproduces the
          reference's ``cfg_interval_start`` rule (unguided iff ``t < start``, strict).
        """
        guidance_null_label(self)
        n = x.shape[0]
        if n % 2:
            raise ValueError(f"forward_with_cfg expects an even (doubled) batch, got {n} rows")
        half = x[: n // 2]
        out = self(torch.cat([half, half], dim=0), t, y)  # (2B, C, H, W); self(): a compiled call
        cond, uncond = out.chunk(2, dim=0)
        t_cond = batch_time(t, n, x.device, check=False).float()[: n // 2]
        g_cond, g_uncond = apply_guidance(cond, uncond, cfg_scale, t_cond, cfg_interval=cfg_interval,
                                          guidance_channels=guidance_channels)
        return torch.cat([g_cond, g_uncond], dim=0)

    def extra_repr(self) -> str:
        c = self.config
        return (f"input_size={c.input_size}, patch_size={c.patch_size}, in_channels={c.in_channels}, "
                f"hidden_size={c.hidden_size}, depth={c.depth}, num_heads={c.num_heads}")



MODEL_CLASSES.register("LatentDiT", LatentDiT)
