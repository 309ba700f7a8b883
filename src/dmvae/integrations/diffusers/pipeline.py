"""``DMVAEPipeline``: class-conditional image generation with a LatentDiT and the DMVAE decoder.

    pipe = DMVAEPipeline.from_dmvae(dit, vae)            # a dmvae.LatentDiT and a dmvae.DMVAE
    images = pipe(class_labels=[207, 360], num_inference_steps=50).images

The loop: noise ``x`` at t = 0 (or ``latents=``), then for each time t_k of the scheduler the
(guided) velocity of the transformer and one scheduler step, up to t = 1; the normalised latents
are mapped back to raw ones with the autoencoder's ``shift_factor`` / ``scaling_factor`` and
decoded. With the same noise, labels, steps, guidance and time shift it computes what
``dmvae.samplers.sample(..., method="euler")`` followed by ``DMVAE.decode(normalize=True)``
computes.

Two schedulers are understood: :class:`DMVAEEulerScheduler` (dmvae's time t, noise -> data) and
diffusers' ``FlowMatchEulerDiscreteScheduler`` with a plain (optionally shifted) grid, whose sigma
runs the other way: the pipeline gives it ``sigmas = 1 - t`` and the velocity ``-v``, so both
integrate the same ODE on the same grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from dmvae.autoencoder import DMVAE
from dmvae.dit import LatentDiT
from dmvae.image import tensor_to_pil
from dmvae.integrations.diffusers.autoencoder import AutoencoderDMVAE
from dmvae.integrations.diffusers.scheduler import DMVAEEulerScheduler
from dmvae.integrations.diffusers.transformer import DMVAETransformer2DModel
from dmvae.samplers import time_grid
from dmvae.transport import _check_interval, apply_guidance, guidance_null_label

__all__ = ["DMVAEPipeline"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# FlowMatchEulerDiscreteScheduler options that change its grid or its step away from the plain
# shifted Euler grid (off by default; older diffusers lack some of them).
_FLOW_MATCH_OPTIONS = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas",
                       "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


class DMVAEPipeline(DiffusionPipeline):
    """Class-to-image generation: a :class:`DMVAETransformer2DModel` over normalised DMVAE latents,
    a :class:`DMVAEEulerScheduler` (or diffusers' ``FlowMatchEulerDiscreteScheduler``, see the
    module docstring) and an :class:`AutoencoderDMVAE`.

    Save and load the whole pipeline with ``save_pretrained`` / ``DMVAEPipeline.from_pretrained``
    (one folder per component plus ``model_index.json``; every model loads strictly).
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer: DMVAETransformer2DModel,
        vae: AutoencoderDMVAE,
        scheduler: DMVAEEulerScheduler | FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        for name, value, kinds in (
            ("transformer", transformer, (DMVAETransformer2DModel,)),
            ("vae", vae, (AutoencoderDMVAE,)),
            ("scheduler", scheduler, (DMVAEEulerScheduler, FlowMatchEulerDiscreteScheduler)),
        ):
            if not isinstance(value, kinds):
                names = " or ".join(k.__name__ for k in kinds)
                raise TypeError(f"DMVAEPipeline: {name} must be a {names}, got {type(value).__name__}")
        if transformer.config.in_channels != vae.config.z_channels:
            raise ValueError(
                f"the transformer takes {transformer.config.in_channels} latent channels but the "
                f"autoencoder makes {vae.config.z_channels}"
            )
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @classmethod
    def from_dmvae(cls, dit: LatentDiT, vae: DMVAE, *, time_shift: float = 1.0) -> DMVAEPipeline:
        """A pipeline holding copies of ``dit`` and ``vae`` (same weights, device and dtype) and a
        scheduler with ``time_shift`` (the ``time_shift`` of :func:`dmvae.samplers.sample`)."""
        return cls(
            transformer=DMVAETransformer2DModel.from_latent_dit(dit),
            vae=AutoencoderDMVAE.from_dmvae(vae),
            scheduler=DMVAEEulerScheduler(shift=time_shift),
        )

    def _labels(self, class_labels: int | Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=device)
        if labels.ndim == 0:
            labels = labels.reshape(1)
        n = self.transformer.config.num_classes
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool or not len(labels):
            raise ValueError(
                f"class_labels must be a non-empty list (or 1-D tensor) of class ids, got shape "
                f"{tuple(labels.shape)} dtype {labels.dtype}"
            )
        if n == 0:
            raise ValueError("this transformer is unconditional (num_classes=0); DMVAEPipeline generates classes")
        if bool(((labels < 0) | (labels >= n)).any()):
            raise ValueError(f"class_labels must lie in [0, {n - 1}], got {labels.tolist()}")
        return labels.long()

    def _set_timesteps(self, num_inference_steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the scheduler's timesteps, dmvae's time t at each, the sign of the velocity it takes)."""
        scheduler = self.scheduler  # checked here too: pipe.scheduler = ... replaces it
        if isinstance(scheduler, DMVAEEulerScheduler):
            scheduler.set_timesteps(num_inference_steps, device=device)
            return scheduler.timesteps, scheduler.timesteps, 1
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(
                "DMVAEPipeline needs a DMVAEEulerScheduler or a FlowMatchEulerDiscreteScheduler, got "
                f"{type(scheduler).__name__}"
            )
        changed = [f"{k}={getattr(scheduler.config, k)!r}" for k in _FLOW_MATCH_OPTIONS
                   if getattr(scheduler.config, k, None)]
        if changed:
            raise ValueError(
                "DMVAEPipeline integrates dmvae's Euler ODE on a plain (shifted) grid; this "
                f"FlowMatchEulerDiscreteScheduler sets {', '.join(changed)}"
            )
        # diffusers' flow matching: sigma = 1 - t (noise at sigma = 1), velocity noise - data = -v;
        # the unshifted grid 1 - linspace(0, 1), shifted by the scheduler's own `shift`
        # (the same map as dmvae.transport.shift_time).
        time_grid(num_inference_steps)  # the same check of num_inference_steps
        # (a float32 numpy array: what every diffusers version takes for custom sigmas)
        sigmas = 1.0 - np.linspace(0.0, 1.0, num_inference_steps + 1, dtype=np.float32)[:-1]
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        return scheduler.timesteps, 1.0 - scheduler.sigmas[:-1], -1

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        *,
        cfg_interval: tuple[float, float] | None = None,
        guidance_channels: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label.

        Args:
            class_labels: class ids in ``[0, num_classes)`` (ImageNet ids for the release).
            num_inference_steps: Euler steps from t = 0 to t = 1 (NFE = steps, doubled where guided).
            guidance_scale: classifier-free guidance ``u + s (c - u)``; 1 = none (one conditional
                forward per step; the release samples without guidance).
            cfg_interval: ``(lo, hi)``: guide only at times ``lo <= t <= hi`` (t = 1 data).
            guidance_channels: None guides every latent channel; k guides channels ``[:k]`` only
                (see :func:`dmvae.transport.apply_guidance`).
            generator: draws the starting noise when ``latents`` is not given.
            latents: the starting noise (B, C, H, W) at t = 0, one row per label.
            output_type: ``"pil"`` (RGB images, dmvae's uint8 rounding), ``"np"`` (float (B, H, W,
                3) in [0, 1]), ``"pt"`` (float (B, 3, H, W) in [0, 1]) or ``"latent"`` (the
                normalised latents at t = 1, not decoded).
            return_dict: return an ``ImagePipelineOutput`` (``.images``) instead of a tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        device = self._execution_device
        transformer, cfg = self.transformer, self.transformer.config
        labels = self._labels(class_labels, device)
        b = labels.shape[0]
        shape = (b, cfg.in_channels, cfg.input_size, cfg.input_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (one row per label), got {tuple(latents.shape)}")
        x = latents.to(device)

        guidance_scale = float(guidance_scale)
        guided = guidance_scale != 1.0
        lo, hi = _check_interval(cfg_interval) if cfg_interval is not None else (0.0, 1.0)
        if guided:  # the one null-class check (a transformer built with class_dropout_prob=0 has none)
            labels_cfg = torch.cat([labels, torch.full_like(labels, guidance_null_label(transformer))])  # (2B,)

        timesteps, model_times, sign = self._set_timesteps(num_inference_steps, device)
        times = model_times.tolist()  # on the host once: the interval test needs no sync per step
        for k, timestep in enumerate(self.progress_bar(timesteps)):
            t = model_times[k]  # dmvae's time: 0 noise, 1 data
            x_in = x.to(transformer.dtype)
            if guided and lo <= times[k] <= hi:
                # conditional and unconditional rows in one forward of the doubled batch
                out = transformer(torch.cat([x_in, x_in]), t.expand(2 * b), labels_cfg,
                                  check_values=False).to(x.dtype)
                cond, uncond = out.chunk(2)
                v, _ = apply_guidance(cond, uncond, guidance_scale, guidance_channels=guidance_channels)
            else:
                v = transformer(x_in, t.expand(b), labels, check_values=False).to(x.dtype)
            x = self.scheduler.step(v if sign > 0 else -v, timestep, x).prev_sample

        if output_type == "latent":
            images: object = x
        else:
            raw = self.vae.denormalize_latents(x)
            decoded = self.vae.decode(raw).sample  # (B, 3, H, W), nominally [-1, 1]
            if output_type == "pil":
                images = tensor_to_pil(decoded.clamp(-1, 1))
            else:
                unit = (decoded / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
                images = unit if output_type == "pt" else unit.permute(0, 2, 3, 1).float().cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)  # type: ignore[arg-type]

