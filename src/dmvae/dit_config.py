"""Configuration and named presets of the :class:`~dmvae.dit.LatentDiT` (LightningDiT).

``LatentDiTConfig`` holds the hyper-parameters under the reference constructor's names; the presets
(``LightningDiT-XL/1``, ...) are one table, :data:`PRESETS`, registered in the one model registry
(:data:`dmvae._registry.MODELS`) next to the autoencoder presets of :mod:`dmvae.autoencoder_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dmvae._config import ConfigMixin

__all__ = ["PRESETS", "LatentDiTConfig"]


@dataclass
class LatentDiTConfig(ConfigMixin):
    """LightningDiT hyper-parameters, under the reference constructor's names.

    The defaults are the reference constructor's (XL/2 over a 32x32x32 latent); the released DMVAE
    generator is ``LatentDiTConfig.from_preset("LightningDiT-XL/1")`` (input 16, 32 channels).
    """

    model: ClassVar[str] = "LatentDiT"

    input_size: int = 32  # latent height = width (tokens per side = input_size / patch_size)
    patch_size: int = 2  # the "/N" of the preset names
    in_channels: int = 32  # latent channels (the DMVAE release: z_channels = 32)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0  # feed-forward width = mlp_ratio * hidden (x 2/3 for SwiGLU)
    class_dropout_prob: float = 0.1  # label dropout in train mode; > 0 adds the null class row
    num_classes: int = 1000  # null / unconditional label id = num_classes; 0 = unconditional model
    learn_sigma: bool = False  # doubles the output channels; forward returns the velocity half only
    use_qknorm: bool = True  # normalise q and k per head before RoPE
    use_swiglu: bool = True  # SwiGLU (w12, w3) instead of a GELU-tanh MLP (fc1, fc2)
    use_rope: bool = True  # 2-D RoPE in attention, on top of the fixed sin-cos pos_embed
    use_rmsnorm: bool = True  # RMSNorm (with weight) instead of LayerNorm without affine
    wo_shift: bool = False  # adaLN without the shift terms in the blocks (scale and gate only)
    use_checkpoint: bool = False  # activation checkpointing of the blocks in train mode

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                     "num_classes"):
            value = getattr(self, name)
            low = 0 if name == "num_classes" else 1  # num_classes = 0: an unconditional model
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"LatentDiTConfig.{name} must be an int >= {low}, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.use_rope and self.head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4, got {self.hidden_size}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        return int(2 / 3 * hidden) if self.use_swiglu else hidden


# ---- presets: one table of field values, registered in dmvae._registry.MODELS -----------------

# (depth, hidden, heads) of the reference LightningDiT_models and the patch sizes ("/N") of each.
_SIZES = {
    "Mini": (6, 256, 4, (1,)),
    "S": (12, 384, 6, (1,)),
    "B": (12, 768, 12, (1, 2)),
    "L": (24, 1024, 16, (1, 2)),
    "XL": (28, 1152, 16, (1, 2)),
    "1p0B": (24, 1536, 24, (1, 2)),
    "1p6B": (28, 1792, 28, (1, 2)),
}
# Presets default to the DMVAE release latent (16x16x32); the reference class default is 32x32.
PRESETS: dict[str, dict[str, Any]] = {
    f"LightningDiT-{size}/{p}": {
        "depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": p,
        "input_size": 16, "in_channels": 32,
    }
    for size, (depth, hidden, heads, patches) in _SIZES.items()
    for p in patches
}
LatentDiTConfig.register_presets(PRESETS)
