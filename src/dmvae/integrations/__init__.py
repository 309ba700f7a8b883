"""Bridges from dmvae to other libraries, each behind its own optional extra.

Nothing here is imported by ``import dmvae``; each integration imports its library when it is
imported itself and says which extra to install when that library is missing.

* :mod:`dmvae.integrations.diffusers` (``pip install "dmvae[diffusers]"``): ``AutoencoderDMVAE``,
  a diffusers-native DMVAE autoencoder, and ``DMVAEPipeline``, class-to-image generation with a
  LatentDiT (see ``docs/diffusers.md``).
"""
