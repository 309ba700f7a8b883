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

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from dmvae._registry import MODEL_CLASSES
from dmvae.autoencoder_config import DMVAEConfig
from dmvae.autoencoder_inputs import (  # noqa: F401 - tokens_to_grid / grid_to_tokens re-exported
    INPUT_RANGE_LIMIT,
    as_image_batch,
    check_images,
    check_latents,
    grid_to_tokens,
    tokens_to_grid,
)
from dmvae.convert import AUTOENCODER
from dmvae.decoders import FluxDecoder
from dmvae.encoders import DINOv2Encoder, load_pretrained_backbone
from dmvae.hub import HubMixin, load_state_dict_strict
from dmvae.tiling import tiled_decode

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DMVAEConfig",
    "DMVAE",
    "DMVAEOutput",
    "tokens_to_grid",
    "grid_to_tokens",
]

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
        # Tiled decoding: None = off; (tile, overlap, context) in latent positions (enable_tiling).
        self.tiling: tuple[int, int, int] | None = None
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

    def enable_tiling(
        self, tile_size: int | None = None, overlap: int | None = None, context: int | None = None
    ) -> DMVAE:
        """Decode latent grids larger than ``tile_size`` in overlapping tiles blended linearly
        (:mod:`dmvae.tiling`), so decoder memory grows with the tile, not the image.

        Args:
            tile_size: tile side in latent positions (default: twice the training grid,
                ``2 * image_size / patch_size``: 512-px tiles for ``dmvae-l``).
            overlap: latent positions shared by neighbouring tiles (default ``tile_size // 4``).
            context: latent positions decoded around each tile and discarded (default
                ``overlap``); more context, closer to a whole decode, more compute.

        Tiled output differs from a whole decode near tile borders (the decoder's receptive field
        and mid-block attention see less context); see ``docs/autoencoder.md`` for the measured
        difference. Encoding is never tiled.
        """
        tile = 2 * self.config.latent_size if tile_size is None else tile_size
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile_size must be a positive int (latent positions), got {tile!r}")
        ov = tile // 4 if overlap is None else overlap
        if isinstance(ov, bool) or not isinstance(ov, int) or not 0 <= ov < tile:
            raise ValueError(f"overlap must be an int in [0, tile_size={tile}), got {ov!r}")
        ctx = ov if context is None else context
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 0:
            raise ValueError(f"context must be an int >= 0, got {ctx!r}")
        self.tiling = (tile, ov, ctx)
        return self

    def disable_tiling(self) -> DMVAE:
        self.tiling = None
        return self

    def compile(  # type: ignore[override]
        self, *, encoder: bool = True, decoder: bool = True, channels_last: bool = True, freezing: bool = False,
        fullgraph: bool = True, dynamic: bool | None = None, mode: str | None = None, backend: str = "inductor",
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

    # ---- input checks (dmvae.autoencoder_inputs) ---------------------------------------------------

    def _check_images(self, images: Any) -> Tensor:
        return check_images(images, self.config.patch_size, check_range=self.check_input_range)

    def _check_latents(self, latents: Any) -> Tensor:
        return check_latents(latents, self.config.z_channels)

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
        if x.shape[0] == 0:
            n = (x.shape[-2] // self.config.patch_size) * (x.shape[-1] // self.config.patch_size)
            return x.new_zeros((0, n, self.encoder.embed_dim), dtype=torch.float32)
        with self._autocast(autocast):
            return self._chunked(lambda c: self.encoder(c).float(), x, chunk_size)

    def encode(self, images: Tensor, normalize: bool = True, *, chunk_size: int | None = None,
               autocast: bool = False) -> Tensor:
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
        if x.shape[0] == 0:  # like decode: an empty batch gives an empty result
            return x.new_zeros((0, *self.latent_shape(*x.shape[-2:])), dtype=torch.float32)
        with self._autocast(autocast):
            z = self._chunked(self._encode_raw, x, chunk_size)  # (B, z, h, w)
        return self.normalize_latents(z) if normalize else z

    def decode(self, latents: Tensor, normalize: bool = True, *, chunk_size: int | None = None,
               autocast: bool = False) -> Tensor:
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
        decode_one: Callable[[Tensor], Tensor] = lambda c: self.decoder(c).float()  # noqa: E731
        if self.tiling is not None:
            tile, overlap, context = self.tiling
            decode_whole = decode_one
            decode_one = lambda c: tiled_decode(  # noqa: E731
                decode_whole, c, tile=tile, overlap=overlap, scale=self.config.patch_size, context=context)
        with self._autocast(autocast):
            return self._chunked(decode_one, z, chunk_size)

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
        images: Image.Image | str | os.PathLike[str] | Tensor | Sequence[Image.Image | str | os.PathLike[str]],
        *,
        output_type: Literal["pil", "pt"] | None = None,
        chunk_size: int | None = None,
        autocast: bool = False,
    ) -> list[Image.Image] | Tensor:
        """Encode and decode images.

        Args:
            images: PIL image(s), image file path(s) or uint8 arrays (each ADM-centre-cropped to
                ``image_size``), or a float tensor (B, 3, H, W) / (3, H, W) in [-1, 1] (used as
                is; H, W multiples of the patch size).
            output_type: ``"pil"`` (a list of RGB images; ``uint8 = clamp(127.5 x + 128)``
                truncated) or ``"pt"`` (the (B, 3, H, W) float32 tensor); default: a tensor for
                tensor input, PIL images otherwise.
            chunk_size, autocast: as in :meth:`encode`.
        """
        from dmvae.image import tensor_to_pil

        if output_type not in (None, "pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        x, from_tensor = as_image_batch(images, self.config.image_size)  # (B, 3, H, W) in [-1, 1]
        kw: dict[str, Any] = dict(normalize=False, chunk_size=chunk_size, autocast=autocast)
        recon = self.decode(self.encode(x, **kw), **kw)
        if (output_type or ("pt" if from_tensor else "pil")) == "pt":
            return recon
        return tensor_to_pil(recon)


MODEL_CLASSES.register("DMVAE", DMVAE)
