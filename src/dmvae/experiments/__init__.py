"""Small end-to-end experiments built from the library's public pieces.

- :mod:`dmvae.experiments.table1`: the paper's Table 1 in miniature on real images (scikit-learn's
  handwritten digits, or any class-folder image set): which reference distribution makes the
  latents easiest for a diffusion model to learn. Run it with ``python benchmarks/table1.py``.

Nothing here is imported by ``import dmvae``; the modules need ``scikit-learn`` only for the
default digits data set (``pip install "dmvae[experiments]"``).
"""

__all__: list[str] = []
