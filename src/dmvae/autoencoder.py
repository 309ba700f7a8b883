"""DMVAE: the Distribution-Matching VAE autoencoder (arXiv 2512.07778).

A deterministic autoencoder (no KL, no sampling):

    images (B, 3, H, W) in [-1, 1]
      -> DINOv2 ViT encoder (timm)                     (B, N, D), N = (H/p)(W/p) patch tokens
      -> MLP bottleneck Linear(D, 2048) -> SiLU -> Linear(2048, z)   (B, N, z)
      -> row-major grid ``b (h w) c -> b c h w``        (B, z, H/p, W/p)   = the latents
      -> Flux-style conv decoder                        (B, 3, H, W), unbounded

Latent normalisation (the README numbers of the release; diffusion models are trained on
normalised latents):  ``z_n = (z - latent_mean) * latent_scale``,  ``z = z_n / latent_scale +
latent_mean`` (``latent_scale`` ~ 1/std; release: mean 0.0685, scale 0.1763).

Module and parameter names follow the reference state dict (``encoder.*``, ``bottle_neck.mlp.*``,
``decoder.*``), so a reference ``vae.pt`` loads with ``strict=True`` without renaming; the
``dmvae-l`` / ``dmvae-b`` presets reproduce the release key/shape sets exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from dmvae._config import ConfigMixin
from dmvae._registry import MODELS
from dmvae.convert import AUTOENCODER
from dmvae.decoders import FluxDecoder
from dmvae.encoders import RESERVED_TIMM_KWARGS, DINOv2Encoder, load_pretrained_backbone
from dmvae.hub import HubMixin, load_state_dict_strict

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DMVAEConfig",
    "DMVAE",
    "DMVAEOutput",
    "list_presets",
    "tokens_to_grid",
    "grid_to_tokens",
]

# Inputs whose values leave [-INPUT_RANGE_LIMIT, INPUT_RANGE_LIMIT] are rejected: they are almost
# certainly [0, 255] images (or unnormalised data), not [-1, 1] images with a little overshoot.
INPUT_RANGE_LIMIT = 1.5


# ################################################################################################
#                                          Config
# ################################################################################################


@dataclass
class DMVAEConfig(ConfigMixin):
    """Architecture and latent statistics of a :class:`DMVAE`. Field names are those of the
    reference fixture manifests. The defaults are the release architecture (``dmvae-l``) with
    identity latent statistics; use :meth:`from_preset` for named configurations."""

    model_class: ClassVar[str] = "dmvae.autoencoder:DMVAE"
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



# ---- presets: tiny named functions in the one model registry (dmvae._registry.MODELS) -----------

_PRESETS = MODELS.entries  # every model family's presets; DMVAE ones return a DMVAEConfig


@MODELS.register("dmvae-l")
def _dmvae_l() -> DMVAEConfig:
    """The release model (HF ``sen-ye/dmvae``, ``vae.pt``): DINOv2-L/16 encoder, z=32, latent
    statistics from the README."""
    return DMVAEConfig(
        encoder="vit_large_patch14_dinov2.lvd142m",
        z_channels=32,
        latent_mean=0.0685,
        latent_scale=0.1763,
    )


@MODELS.register("dmvae-b")
def _dmvae_b() -> DMVAEConfig:
    """DINOv2-B/16 encoder, z=16 (the reference class defaults); identity latent statistics."""
    return DMVAEConfig(encoder="vit_base_patch14_dinov2.lvd142m", z_channels=16)


@MODELS.register("dmvae-tiny")
def _dmvae_tiny() -> DMVAEConfig:
    """The shrunk configuration of the upstream golden fixtures (96-d/2-block ViT, z=8,
    decoder 32 x (1,2,2,2), 1+1 blocks per level); for tests, random weights only."""
    return DMVAEConfig(
        encoder="vit_base_patch14_dinov2.lvd142m",
        encoder_kwargs={"embed_dim": 96, "depth": 2, "num_heads": 2},
        bottleneck_dim=128,
        z_channels=8,
        decoder_channels=32,
        decoder_channel_mult=(1, 2, 2, 2),
        decoder_num_res_blocks=1,
    )


def list_presets() -> list[str]:
    """Names accepted by :meth:`DMVAEConfig.from_preset` (and wherever a preset name is taken)."""
    return DMVAEConfig.preset_names()


# ################################################################################################
#                                     Layout helpers
# ################################################################################################


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


# ################################################################################################
#                                          Model
# ################################################################################################


@dataclass
class DMVAEOutput:
    """Result of :meth:`DMVAE.forward`."""

    reconstruction: Tensor  # (B, 3, H, W) float32, unbounded (nominally [-1, 1])
    latents: Tensor  # (B, z, H/p, W/p) float32, raw (not normalised)
    normalized_latents: Tensor  # (B, z, H/p, W/p) float32, (latents - mean) * scale


class MLPBottleneck(nn.Module):
    """Per-token MLP ``Linear(D, hidden) -> SiLU -> Linear(hidden, z)`` (``bottle_neck.mlp``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, z)
        return self.mlp(x)


class DMVAE(nn.Module, HubMixin):
    """The DMVAE autoencoder.

    Args:
        config: a :class:`DMVAEConfig`, a dict of its fields, or a preset name (``"dmvae-l"``).

    Building never downloads anything (the encoder is created with ``pretrained=False``); weights
    come from :meth:`from_pretrained` / :meth:`load_weights`, or, for training from scratch,
    :meth:`init_encoder_from_pretrained`.

    ``encode`` / ``decode`` / ``forward`` are differentiable (wrap them in ``torch.no_grad()``
    for inference); they move inputs to the model's device and dtype and return float32.
    """

    config_class = DMVAEConfig
    _reference_filenames = ("vae.pt",)
    # Raw weights ('vae_wo_ddp', present in every reference checkpoint) unless use_ema=True is
    # asked for; a file without 'vae_ema' then raises instead of silently using the raw weights.
    _reference_layout = AUTOENCODER
    _default_use_ema = AUTOENCODER.default_use_ema
    # The release ships vae.pt without a config: DINOv2-L, z=32, the released latent statistics.
    _reference_default_config = "dmvae-l"

    def __init__(self, config: DMVAEConfig | Mapping[str, Any] | str) -> None:
        super().__init__()
        config = self._resolve_config(config)
        self.config: DMVAEConfig = config
        self.encoder = DINOv2Encoder(
            config.encoder,
            patch_size=config.patch_size,
            img_size=config.image_size,
            encoder_kwargs=config.encoder_kwargs,
        )
        self.decoder = FluxDecoder(
            z_channels=config.z_channels,
            channels=config.decoder_channels,
            channel_mult=config.decoder_channel_mult,
            num_res_blocks=config.decoder_num_res_blocks,
            out_channels=3,
        )
        self.bottle_neck = MLPBottleneck(self.encoder.embed_dim, config.bottleneck_dim, config.z_channels)
        # Batch slicing: None = whole batch at once; k = chunks of k images (see enable_slicing).
        self.slice_size: int | None = None
        # Reject inputs outside [-1.5, 1.5] (costs one min/max reduction per call).
        self.check_input_range: bool = True
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference initialisation of the trainable non-encoder parts (``init_weights(., 0.02)``
        on the decoder and the bottleneck): Conv/Linear weights ~ truncated normal (std 0.02,
        cut at +-2 absolute), biases 0; GroupNorm/LayerNorm weight 1, bias 0. The encoder keeps
        timm's initialisation (its weights are meant to come from DINOv2 or a checkpoint)."""

        def init(module: nn.Module) -> None:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.decoder.apply(init)
        self.bottle_neck.apply(init)

    # ---- properties -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(z, H/p, W/p) for images of ``height x width`` (default: the training size)."""
        height = self.config.image_size if height is None else height
        width = height if width is None else width
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={p}")
        return (self.config.z_channels, height // p, width // p)

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters per part (encoder / bottleneck / decoder / total)."""
        counts = {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "bottleneck": sum(p.numel() for p in self.bottle_neck.parameters()),
            "decoder": sum(p.numel() for p in self.decoder.parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts

    # ---- training switches ------------------------------------------------------------------------

    def freeze_encoder(self, frozen: bool = True) -> DMVAE:
        """Stop (or with ``frozen=False`` restart) gradient updates of the ViT encoder (the
        tokenizer pre-training stage freezes it)."""
        self.encoder.requires_grad_(not frozen)
        return self

    def freeze_bottleneck(self, frozen: bool = True) -> DMVAE:
        self.bottle_neck.requires_grad_(not frozen)
        return self

    def freeze_decoder(self, frozen: bool = True) -> DMVAE:
        self.decoder.requires_grad_(not frozen)
        return self

    def enable_slicing(self, chunk_size: int = 1) -> DMVAE:
        """Process batches in chunks of ``chunk_size`` images in encode/decode/forward, so peak
        activation memory does not grow with the batch size (results are unchanged)."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.slice_size = chunk_size
        return self

    def disable_slicing(self) -> DMVAE:
        self.slice_size = None
        return self

    def compile(  # type: ignore[override]
        self,
        *,
        encoder: bool = True,
        decoder: bool = True,
        channels_last: bool = True,
        freezing: bool = False,
        fullgraph: bool = True,
        dynamic: bool | None = None,
        mode: str | None = None,
        backend: str = "inductor",
    ) -> DMVAE:
        """Compile encode / decode with ``torch.compile``, in place (see ``docs/performance.md``).

        * encoder: *regional* compilation of the repeated ViT block (one graph shared by all
          blocks; compile time of one block);
        * decoder: the whole Flux decoder as one graph (its blocks differ in width and resolution,
          so they would not share graphs anyway), GroupNorm + SiLU + residual adds fused by
          inductor;
        * ``channels_last``: run the decoder in NHWC (:meth:`FluxDecoder.set_memory_format`),
          ~4e-5 from the reference fixtures instead of ~1e-5, and faster on CPU and GPU;
        * ``freezing``: inductor freezing of the decoder for inference (weights folded in as
          constants, conv weights pre-packed). Only calls without gradient tracking are frozen,
          and the frozen graph keeps the weights it saw: load new weights BEFORE compiling.

        ``fullgraph=True`` turns any graph break into an error; ``dynamic`` / ``mode`` /
        ``backend`` are passed to ``torch.compile`` (``mode="max-autotune"`` tunes GPU kernels,
        ``backend="eager"`` only traces). Returns ``self``; the state dict is unchanged.
        """
        from dmvae._compile import compile_module, compile_repeated_blocks

        kw: dict[str, Any] = dict(fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend)
        self.decoder.set_memory_format(torch.channels_last if channels_last else torch.contiguous_format)
        if encoder:
            blocks = getattr(self.encoder.model, "blocks", None)
            if blocks is None or len(blocks) == 0:
                raise ValueError(f"the encoder {self.config.encoder!r} has no repeated 'blocks' to compile")
            compile_repeated_blocks(self.encoder.model, type(blocks[0]), **kw)
        if decoder:
            compile_module(self.decoder, options={"freezing": True} if freezing else None, **kw)
        return self

    def init_encoder_from_pretrained(self, source: str | os.PathLike[str] | None = None) -> DMVAE:
        """Initialise the ViT encoder from pretrained (DINOv2) weights, for training from scratch.

        Args:
            source: a local weights file holding the timm ViT state dict at its native resolution
                (e.g. patch 14 / 518 px), a timm model name, or ``'hf-hub:timm/...'``; default:
                ``config.encoder`` (``vit_large_patch14_dinov2.lvd142m`` for ``dmvae-l``), fetched
                through timm / the Hugging Face cache (``HF_HUB_OFFLINE=1`` = cache only).

        timm resamples the patch-embedding kernel and the pos-embed to ``patch_size`` /
        ``image_size`` (the reference's ``pretrained=True, patch_size=16, img_size=256``). The
        load is strict and all-or-nothing. Decoder and bottleneck are untouched.
        """
        state_dict = load_pretrained_backbone(
            self.config.encoder if source is None else source,
            architecture=self.config.encoder,
            patch_size=self.config.patch_size,
            img_size=self.config.image_size,
            encoder_kwargs=self.config.encoder_kwargs,
        )
        name = f"pretrained encoder {source or self.config.encoder}"
        load_state_dict_strict(self.encoder.model, state_dict, source=name)
        return self

    # ---- latent normalisation -----------------------------------------------------------------------

    def normalize_latents(self, latents: Tensor) -> Tensor:
        """``z_n = (z - latent_mean) * latent_scale`` (what diffusion models are trained on)."""
        return (latents - self.config.latent_mean) * self.config.latent_scale

    def denormalize_latents(self, latents: Tensor) -> Tensor:
        """``z = z_n / latent_scale + latent_mean`` (the inverse of :meth:`normalize_latents`)."""
        return latents / self.config.latent_scale + self.config.latent_mean

    # ---- input checks -------------------------------------------------------------------------------

    def _check_images(self, images: Any) -> Tensor:
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
        if not images.is_floating_point():
            raise TypeError(
                f"expected floating-point images in [-1, 1], got dtype {images.dtype} "
                "(for uint8 images use images.float() / 127.5 - 1, or dmvae.image.pil_to_tensor)"
            )
        height, width = images.shape[-2:]
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image height and width must be multiples of the patch size {p}, got {height}x{width} "
                f"(crop or resize, e.g. to {max(p, height // p * p)}x{max(p, width // p * p)}; "
                "dmvae.image.center_crop_arr does ADM's centre crop)"
            )
        if self.check_input_range and images.numel() > 0:
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
        return images

    def _check_latents(self, latents: Any) -> Tensor:
        if not isinstance(latents, Tensor):
            raise TypeError(
                f"expected latents as a torch.Tensor of shape (B, {self.config.z_channels}, h, w), "
                f"got {type(latents).__name__}"
            )
        if not latents.is_floating_point():
            raise TypeError(f"expected floating-point latents, got dtype {latents.dtype}")
        z = self.config.z_channels
        if latents.ndim == 3:  # the reference's token layout (B, N, z) with a square grid
            if latents.shape[-1] != z:
                raise ValueError(
                    f"expected latent tokens of shape (B, N, {z}), got {tuple(latents.shape)}"
                )
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
        return latents

    # ---- core computation -----------------------------------------------------------------------------

    def _chunked(self, fn: Callable[[Tensor], Tensor], x: Tensor, chunk_size: int | None) -> Tensor:
        chunk = self.slice_size if chunk_size is None else chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk!r}")
        if chunk is None or x.shape[0] <= chunk:
            return fn(x)
        return torch.cat([fn(part) for part in x.split(chunk)], dim=0)

    def _autocast(self, enabled: bool) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _encode_raw(self, x: Tensor) -> Tensor:  # x: (b, 3, H, W) on the model's device/dtype
        h, w = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
        tokens = self.encoder(x)  # (b, h*w, D)
        z = self.bottle_neck(tokens)  # (b, h*w, z)
        # contiguous NCHW: the rearranged view has channels-last strides (see decode)
        return rearrange(z, "b (h w) c -> b c h w", h=h, w=w).float().contiguous()  # (b, z, h, w)

    def encode_features(
        self, images: Tensor, *, chunk_size: int | None = None, autocast: bool = False
    ) -> Tensor:
        """The encoder's patch tokens (B, (H/p)(W/p), D) before the bottleneck, float32."""
        x = self._check_images(images).to(device=self.device, dtype=self.dtype)
        with self._autocast(autocast):
            return self._chunked(lambda c: self.encoder(c).float(), x, chunk_size)

    def encode(
        self,
        images: Tensor,
        normalize: bool = True,
        *,
        chunk_size: int | None = None,
        autocast: bool = False,
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, z, H/p, W/p), float32.

        Args:
            images: float tensor; H and W multiples of ``patch_size``. Moved to the model's
                device and dtype.
            normalize: return ``(z - latent_mean) * latent_scale`` (diffusion-ready); ``False``
                returns the raw bottleneck output.
            chunk_size: images per chunk (default: the :meth:`enable_slicing` setting, else all).
            autocast: run under bf16 autocast on the model's device (the reference runs the VAE
                in bf16 on GPU).
        """
        x = self._check_images(images).to(device=self.device, dtype=self.dtype)
        with self._autocast(autocast):
            z = self._chunked(self._encode_raw, x, chunk_size)  # (B, z, h, w)
        return self.normalize_latents(z) if normalize else z

    def decode(
        self,
        latents: Tensor,
        normalize: bool = True,
        *,
        chunk_size: int | None = None,
        autocast: bool = False,
    ) -> Tensor:
        """Latents (B, z, h, w) -> images (B, 3, h*p, w*p), float32, unbounded (nominally [-1, 1]).

        Args:
            latents: a float grid; the reference's square token layout (B, h*w, z) is also
                accepted. Moved to the model's device.
            normalize: the latents are normalised (as returned by ``encode(normalize=True)`` or
                produced by a diffusion model) and are first mapped back with
                ``z = z_n / latent_scale + latent_mean``; ``False`` for raw latents.
            chunk_size, autocast: as in :meth:`encode`.
        """
        z = self._check_latents(latents).to(device=self.device)
        z = z.float()
        if normalize:
            z = self.denormalize_latents(z)
        # Contiguous NCHW on purpose: a channels-last view (what rearranging tokens gives) sends
        # torch's CPU conv/GroupNorm down their channels-last kernels, measured ~10x further from
        # a float64 evaluation (4e-5 vs 4e-6 on the golden fixtures) than the reference.
        z = z.to(self.dtype).contiguous()
        with self._autocast(autocast):
            return self._chunked(lambda c: self.decoder(c).float(), z, chunk_size)

    def forward(
        self, images: Tensor, *, chunk_size: int | None = None, autocast: bool = False
    ) -> DMVAEOutput:
        """Encode and decode (the training path): reconstruction plus raw and normalised latents."""
        latents = self.encode(images, normalize=False, chunk_size=chunk_size, autocast=autocast)
        reconstruction = self.decode(latents, normalize=False, chunk_size=chunk_size, autocast=autocast)
        return DMVAEOutput(
            reconstruction=reconstruction,
            latents=latents,
            normalized_latents=self.normalize_latents(latents),
        )

    @torch.no_grad()
    def reconstruct(
        self,
        images: Image.Image | Sequence[Image.Image],
        *,
        chunk_size: int | None = None,
        autocast: bool = False,
    ) -> list[Image.Image]:
        """PIL image(s) -> reconstructed PIL images at ``image_size`` (ADM centre crop, encode,
        decode, ``uint8 = clamp(127.5 x + 128)`` truncated)."""
        from dmvae.image import pil_to_tensor, tensor_to_pil

        x = pil_to_tensor(images, size=self.config.image_size)  # (B, 3, S, S) in [-1, 1]
        recon = self.decode(
            self.encode(x, normalize=False, chunk_size=chunk_size, autocast=autocast),
            normalize=False,
            chunk_size=chunk_size,
            autocast=autocast,
        )
        return tensor_to_pil(recon)
