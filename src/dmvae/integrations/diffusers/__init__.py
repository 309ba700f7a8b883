"""DMVAE inside diffusers (``pip install "dmvae[diffusers]"``; see ``docs/diffusers.md``).

* :class:`AutoencoderDMVAE`: the DMVAE autoencoder as a diffusers model (``ModelMixin`` /
  ``ConfigMixin``, ``AutoencoderKL``-style ``encode(x).latent_dist`` / ``decode(z).sample``) on
  **raw** latents; ``config.shift_factor`` / ``config.scaling_factor`` are the latent statistics,
  so ``(z - shift_factor) * scaling_factor`` is exactly ``DMVAE.encode(x)``.
* :class:`DMVAETransformer2DModel`: a :class:`~dmvae.dit.LatentDiT` that is also a diffusers
  ``ModelMixin`` (same modules, state dict and ``forward(x, t, y)``; t = 1 is data).
* :class:`DMVAEEulerScheduler`: Euler steps of the flow ODE on dmvae's time grid, as a diffusers
  ``SchedulerMixin``.
* :class:`DMVAEPipeline`: class-conditional generation, ``pipe(class_labels=[207, 360]).images``.

Importing this module imports diffusers; without it the ``ImportError`` names the extra.
"""

from __future__ import annotations

#: The oldest diffusers this integration is tested with (keep in step with pyproject.toml).
MIN_DIFFUSERS_VERSION = (0, 30, 0)
_INSTALL_HINT = 'pip install "dmvae[diffusers]"'


def _require_diffusers() -> None:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f"dmvae.integrations.diffusers needs the diffusers package, which is not installed "
            f"(or cannot be imported: {e}); install it with: {_INSTALL_HINT}"
        ) from e
    parts = []
    for piece in str(getattr(diffusers, "__version__", "0")).split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_DIFFUSERS_VERSION:
        need = ".".join(map(str, MIN_DIFFUSERS_VERSION))
        raise ImportError(
            f"dmvae.integrations.diffusers needs diffusers>={need}, found {diffusers.__version__}; "
            f"upgrade with: {_INSTALL_HINT}"
        )


_require_diffusers()

from dmvae.integrations.diffusers.autoencoder import AutoencoderDMVAE
from dmvae.integrations.diffusers.pipeline import DMVAEPipeline
from dmvae.integrations.diffusers.scheduler import DMVAEEulerScheduler
from dmvae.integrations.diffusers.transformer import DMVAETransformer2DModel

__all__ = [
    "MIN_DIFFUSERS_VERSION",
    "AutoencoderDMVAE",
    "DMVAEEulerScheduler",
    "DMVAEPipeline",
    "DMVAETransformer2DModel",
]
