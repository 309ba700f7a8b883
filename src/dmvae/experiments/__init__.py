"""Small end-to-end experiments built from the library's public pieces (the top layer: nothing in
dmvae imports them).

- :mod:`dmvae.experiments.table1`: the paper's Table 1 and Fig. 6 in miniature on real images
  (Fashion-MNIST, scikit-learn's digits or any class-folder image set): does distribution
  matching toward a class-structured reference make latents easier for a diffusion model to
  learn? Run it with ``python benchmarks/table1.py``. Its pieces: :mod:`~.data` (image sets and
  splits), :mod:`~.settings` (settings and rows), :mod:`~.nets` (pretrained encoders, evaluation
  classifier), :mod:`~.stages` (training stages), :mod:`~.measures` (metrics and gates),
  :mod:`~.table1_report` (tables and pictures).

Nothing here is imported by ``import dmvae``; the modules need ``scikit-learn`` (``pip install
"dmvae[experiments]"``) and, for the pictures, ``matplotlib``.
"""

__all__: list[str] = []
