"""Configuration and named presets of the :class:`~dmvae.autoencoder.DMVAE` autoencoder.

``DMVAEConfig`` holds the architecture and the latent statistics; the presets (``dmvae-l``,
``dmvae-b``, ``dmvae-tiny``) are one table, :data:`PRESETS`, registered in the one model registry
(:data:`dmvae._registry.MODELS`) next to the LatentDiT presets of :mod:`dmvae.dit_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dmvae._config import ConfigMixin
from dmvae.encoders import RESERVED_TIMM_KWARGS

__all__ = ["PRESETS", "DMVAEConfig"]


# ################################################################################################
#                                          Config
# ################################################################################################


@dataclass
class DMVAEConfig(ConfigMixin):
    """Architecture and latent statistics of a :class:`DMVAE`. Field names are those of the
    reference fixture manifests. The defaults are the release architecture (``dmvae-l``) with
    identity latent statistics; use :meth:`from_preset` for named configurations."""

    model: ClassVar[str] = "DMVAE"
    #: Fields a saved ``config.json`` must state: without them the latents would silently be
    #: normalised with 0 / 1 (see :meth:`ConfigMixin.load`).
    required_in_file: ClassVar[tuple[str, ...]] = ("latent_mean", "latent_scale")

    # Training resolution in pixels. Fixes the stored pos-embed grid ((image_size/patch_size)^2
    # positions + the CLS token); other sizes (multiples of patch_size) work at inference through
    # bicubic pos-embed resampling.
    image_size: int = 256
    # timm model name of the ViT encoder (architecture only; weights come from the checkpoint or
    # DMVAE.init_encoder_from_pretrained).
    encoder: str = "vit_large_patch14_dinov2.lvd142m"
    # Extra kwargs for timm.create_model (e.g. embed_dim / depth / num_heads for small test
    # models). patch_size, img_size, num_classes, pretrained and dynamic_img_size are set by DMVAE.
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    # ViT patch size = pixels per latent position. The DINOv2 14-px kernel is resampled to 16.
    # Must equal the decoder's upsampling factor 2 ** len(decoder_channel_mult).
    patch_size: int = 16
    # Hidden width of the MLP bottleneck Linear(D, bottleneck_dim) -> SiLU -> Linear(., z).
    bottleneck_dim: int = 2048
    # Latent channels z (32 for the release; the LightningDiT's in_channels).
    z_channels: int = 32
    # Base width of the decoder; level i has decoder_channels * decoder_channel_mult[i] channels
    # (every such width must be divisible by 32, the GroupNorm group count).
    decoder_channels: int = 128
    # Per-level width multipliers of the decoder, from full resolution (level 0) upwards.
    decoder_channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    # ResNet blocks per decoder level is decoder_num_res_blocks + 1 (the Flux convention).
    decoder_num_res_blocks: int = 2
    # Latent normalisation z_n = (z - latent_mean) * latent_scale. 0 / 1 = identity (compute
    # them from data for a new model; the release uses 0.0685 / 0.1763).
    latent_mean: float = 0.0
    latent_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.decoder_channel_mult, list):
            self.decoder_channel_mult = tuple(self.decoder_channel_mult)
        for name in ("image_size", "patch_size", "bottleneck_dim", "z_channels", "decoder_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DMVAEConfig.{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.decoder_num_res_blocks, bool)
            or not isinstance(self.decoder_num_res_blocks, int)
            or self.decoder_num_res_blocks < 0
        ):
            raise ValueError(
                f"DMVAEConfig.decoder_num_res_blocks must be an int >= 0, got {self.decoder_num_res_blocks!r}"
            )
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ValueError(f"DMVAEConfig.encoder must be a timm model name, got {self.encoder!r}")
        if not isinstance(self.encoder_kwargs, dict):
            raise ValueError(
                f"DMVAEConfig.encoder_kwargs must be a dict, got {type(self.encoder_kwargs).__name__}"
            )
        clash = sorted(RESERVED_TIMM_KWARGS & set(self.encoder_kwargs))
        if clash:
            raise ValueError(
                f"DMVAEConfig.encoder_kwargs may not set {clash}; use the config fields "
                "patch_size / image_size instead (DMVAE sets the others itself)"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"DMVAEConfig.image_size must be a multiple of patch_size={self.patch_size}, "
                f"got {self.image_size}"
            )
        mult = self.decoder_channel_mult
        if (
            not isinstance(mult, tuple)
            or not mult
            or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult)
        ):
            raise ValueError(
                f"DMVAEConfig.decoder_channel_mult must be a non-empty tuple of positive ints, got {mult!r}"
            )
        if 2 ** len(mult) != self.patch_size:
            raise ValueError(
                f"the decoder upsamples by 2 ** len(decoder_channel_mult) = {2 ** len(mult)} but "
                f"patch_size is {self.patch_size}; they must be equal (e.g. 4 levels for patch 16)"
            )
        bad = [self.decoder_channels * m for m in mult if (self.decoder_channels * m) % 32]
        if bad:
            raise ValueError(
                f"decoder widths decoder_channels * decoder_channel_mult = {bad} are not divisible "
                "by 32 (the GroupNorm group count)"
            )
        for name in ("latent_mean", "latent_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DMVAEConfig.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.latent_scale == 0.0:
            raise ValueError("DMVAEConfig.latent_scale must be non-zero (it multiplies the latents)")

    @property
    def latent_size(self) -> int:
        """Latent grid side at the training resolution (``image_size // patch_size``)."""
        return self.image_size // self.patch_size


# ---- presets: one table of field values, registered in dmvae._registry.MODELS -----------------

PRESETS: dict[str, dict[str, Any]] = {
    # The release model (HF ``sen-ye/dmvae``, ``vae.pt``): DINOv2-L/16 encoder, z=32, latent
    # statistics from the README.
    "dmvae-l": {
        "encoder": "vit_large_patch14_dinov2.lvd142m",
        "z_channels": 32,
        "latent_mean": 0.0685,
        "latent_scale": 0.1763,
    },
    # DINOv2-B/16 encoder, z=16 (the reference class defaults); identity latent statistics.
    "dmvae-b": {"encoder": "vit_base_patch14_dinov2.lvd142m", "z_channels": 16},
    # The shrunk configuration of the upstream golden fixtures (96-d/2-block ViT, z=8, decoder
    # 32 x (1,2,2,2), 1+1 blocks per level); for tests, random weights only.
    "dmvae-tiny": {
        "encoder": "vit_base_patch14_dinov2.lvd142m",
        "encoder_kwargs": {"embed_dim": 96, "depth": 2, "num_heads": 2},
        "bottleneck_dim": 128,
        "z_channels": 8,
        "decoder_channels": 32,
        "decoder_channel_mult": (1, 2, 2, 2),
        "decoder_num_res_blocks": 1,
    },
}
DMVAEConfig.register_presets(PRESETS)
