"""``AutoencoderDMVAE``: the DMVAE autoencoder as a diffusers model.

It holds the very modules of a :class:`~dmvae.autoencoder.DMVAE` (``encoder``, ``decoder``,
``bottle_neck``: the same state-dict keys and shapes, so conversion is lossless both ways) and
speaks diffusers' ``AutoencoderKL`` dialect on **raw** latents:

    posterior = vae.encode(x).latent_dist         # deterministic: sample() == mode() == raw z
    z_n = (posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor
                                                  # == DMVAE.encode(x) (what a DiT is trained on)
    x_hat = vae.decode(z_n / vae.config.scaling_factor + vae.config.shift_factor).sample

DMVAE's latent statistics are two scalars (``latent_mean`` / ``latent_scale``), stored here as
``shift_factor`` / ``scaling_factor`` (the names diffusers' SD3 / Flux VAEs use for the same
affine map); there are no per-channel ``latents_mean`` / ``latents_std``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import Tensor

from dmvae.autoencoder import DMVAE, DMVAEConfig
from dmvae.integrations.diffusers._loading import StrictLoadingMixin, copy_module

__all__ = ["AutoencoderDMVAE", "DeterministicLatentDistribution"]

_DEFAULTS = DMVAEConfig()


class DeterministicLatentDistribution:
    """The ``latent_dist`` of a deterministic autoencoder: a point mass at the raw latents.

    Answers what diffusers' training scripts ask of ``AutoencoderKL``'s Gaussian posterior:
    ``sample()`` and ``mode()`` (and ``mean``) are the latents, ``kl()`` is zero.
    """

    def __init__(self, latents: Tensor) -> None:
        self.latents = latents  # (B, z, h, w) raw latents

    @property
    def mean(self) -> Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """The latents themselves (no noise is drawn; ``generator`` is accepted and unused)."""
        return self.latents

    def mode(self) -> Tensor:
        return self.latents

    def kl(self, other: object = None) -> Tensor:
        """Zero per sample (B,): DMVAE has no KL term."""
        return self.latents.new_zeros(self.latents.shape[0])


class AutoencoderDMVAE(StrictLoadingMixin, ModelMixin, ConfigMixin):
    """The DMVAE autoencoder (arXiv 2512.07778) for diffusers: images in [-1, 1] <-> raw latents.

    Args (the :class:`~dmvae.autoencoder.DMVAEConfig` fields, documented there, under the same
    names except three):
        encoder_name: DMVAE's ``encoder`` (the timm model name; ``encoder`` is the module here).
        shift_factor: DMVAE's ``latent_mean`` (release: 0.0685).
        scaling_factor: DMVAE's ``latent_scale`` (release: 0.1763); diffusion models see
            ``(z - shift_factor) * scaling_factor``.

    Build it from a DMVAE with :meth:`from_dmvae` (and back with :meth:`to_dmvae`), or load one
    saved with ``save_pretrained`` through :meth:`from_pretrained` (``subfolder="vae"`` inside a
    pipeline), which is strict: missing, unexpected or mismatched keys raise
    :class:`~dmvae.files.CheckpointError`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        image_size: int = _DEFAULTS.image_size,
        encoder_name: str = _DEFAULTS.encoder,
        encoder_kwargs: dict[str, Any] | None = None,
        patch_size: int = _DEFAULTS.patch_size,
        bottleneck_dim: int = _DEFAULTS.bottleneck_dim,
        z_channels: int = _DEFAULTS.z_channels,
        decoder_channels: int = _DEFAULTS.decoder_channels,
        decoder_channel_mult: tuple[int, ...] = _DEFAULTS.decoder_channel_mult,
        decoder_num_res_blocks: int = _DEFAULTS.decoder_num_res_blocks,
        shift_factor: float = _DEFAULTS.latent_mean,
        scaling_factor: float = _DEFAULTS.latent_scale,
    ) -> None:
        super().__init__()
        vae = DMVAE(self.dmvae_config())
        # Registered in DMVAE's order, so the state dict is DMVAE's key for key.
        self.encoder = vae.encoder
        self.decoder = vae.decoder
        self.bottle_neck = vae.bottle_neck
        # The DMVAE whose encode/decode run our modules (kept out of the module tree: no second
        # copy of the keys); it also holds the slicing / tiling settings.
        self.__dict__["_dmvae"] = vae

    # ---- conversion -------------------------------------------------------------------------------

    def dmvae_config(self) -> DMVAEConfig:
        """This model's configuration as a :class:`~dmvae.autoencoder.DMVAEConfig`."""
        cfg = dict(self.config)
        fields = {k: cfg[k] for k in DMVAEConfig.__dataclass_fields__ if k in cfg}
        fields["encoder"] = cfg["encoder_name"]
        fields["encoder_kwargs"] = dict(cfg.get("encoder_kwargs") or {})
        fields["decoder_channel_mult"] = tuple(cfg["decoder_channel_mult"])
        fields["latent_mean"] = cfg["shift_factor"]
        fields["latent_scale"] = cfg["scaling_factor"]
        return DMVAEConfig(**fields)

    @staticmethod
    def config_from_dmvae(config: DMVAEConfig) -> dict[str, Any]:
        """The constructor arguments of an ``AutoencoderDMVAE`` for a ``DMVAEConfig``."""
        fields = config.to_dict()
        fields["encoder_name"] = fields.pop("encoder")
        fields["shift_factor"] = fields.pop("latent_mean")
        fields["scaling_factor"] = fields.pop("latent_scale")
        fields["decoder_channel_mult"] = tuple(fields["decoder_channel_mult"])
        return fields

    @classmethod
    def from_dmvae(cls, vae: DMVAE) -> AutoencoderDMVAE:
        """A copy of ``vae`` (same weights, device, dtype and latent statistics)."""
        if not isinstance(vae, DMVAE):
            raise TypeError(f"from_dmvae expects a dmvae.DMVAE, got {type(vae).__name__}")
        model = copy_module(lambda: cls(**cls.config_from_dmvae(vae.config)), vae)
        model._dmvae.check_input_range = vae.check_input_range
        return model

    def to_dmvae(self) -> DMVAE:
        """A :class:`~dmvae.autoencoder.DMVAE` copy of this model (same weights and statistics)."""
        cfg = self.dmvae_config()
        vae = copy_module(lambda: DMVAE(cfg), self)
        vae.check_input_range = self._dmvae.check_input_range
        return vae

    def _view(self) -> DMVAE:
        """The DMVAE over this model's current modules (they may have been replaced by a loader
        or wrapped since construction)."""
        vae: DMVAE = self.__dict__["_dmvae"]
        vae.encoder, vae.decoder, vae.bottle_neck = self.encoder, self.decoder, self.bottle_neck
        vae.training = self.training
        return vae

    # ---- diffusers' autoencoder interface ---------------------------------------------------------

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DeterministicLatentDistribution]:
        """Images (B, 3, H, W) in [-1, 1] (H, W multiples of ``patch_size``) -> raw latents
        (B, z, H/p, W/p), float32, wrapped in a deterministic ``latent_dist`` whose ``sample()``
        and ``mode()`` both return them."""
        z = self._view().encode(x, normalize=False)
        dist = DeterministicLatentDistribution(z)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(
        self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[Tensor]:
        """Raw latents (B, z, h, w) -> images (B, 3, h p, w p), float32, nominally [-1, 1]
        (unclamped). ``generator`` is accepted for diffusers' signature and unused."""
        images = self._view().decode(z, normalize=False)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(
        self,
        sample: Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[Tensor]:
        """Encode and decode (the latent distribution is deterministic, so ``sample_posterior``
        changes nothing)."""
        z = self.encode(sample).latent_dist.mode()
        return self.decode(z, return_dict=return_dict)

    # ---- memory switches (DMVAE's slicing and tiling) -----------------------------------------------

    def enable_slicing(self, chunk_size: int = 1) -> None:
        """Encode / decode batches in chunks of ``chunk_size`` images (results unchanged)."""
        self._view().enable_slicing(chunk_size)

    def disable_slicing(self) -> None:
        self._view().disable_slicing()

    def enable_tiling(
        self, tile_size: int | None = None, overlap: int | None = None, context: int | None = None
    ) -> None:
        """Decode large latent grids in overlapping tiles (:meth:`dmvae.DMVAE.enable_tiling`:
        sizes in latent positions, defaults from the training resolution)."""
        self._view().enable_tiling(tile_size, overlap, context)

    def disable_tiling(self) -> None:
        self._view().disable_tiling()

    @property
    def use_slicing(self) -> bool:
        return self.__dict__["_dmvae"].slice_size is not None

    @property
    def use_tiling(self) -> bool:
        return self.__dict__["_dmvae"].tiling is not None

    # ---- latent normalisation ---------------------------------------------------------------------------

    def normalize_latents(self, latents: Tensor) -> Tensor:
        """``(z - shift_factor) * scaling_factor``: raw latents -> what a diffusion model sees."""
        return (latents - self.config.shift_factor) * self.config.scaling_factor

    def denormalize_latents(self, latents: Tensor) -> Tensor:
        """``z_n / scaling_factor + shift_factor``: a diffusion model's latents -> raw latents."""
        return latents / self.config.scaling_factor + self.config.shift_factor
