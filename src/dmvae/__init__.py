"""dmvae: the Distribution-Matching VAE (arXiv 2512.07778) and the pieces around it."""

from dmvae._version import __version__

__all__ = ["__version__"]
