"""Evaluation metrics: PSNR/SSIM, FID/IS statistics and the Inception-v3 extractor, and
distribution distances between sample sets.

``dmvae.metrics.image``: :func:`psnr`, :func:`ssim` (scikit-image-exact), uint8 conversion.
``dmvae.metrics.fid``: :func:`frechet_distance`, :func:`inception_score`,
:class:`StreamingStats`, :func:`load_reference_stats`, :class:`InceptionV3Features`.
``dmvae.metrics.precision_recall``: k-NN improved precision/recall (Kynkäänniemi et al. 2019).
``dmvae.metrics.distribution``: energy distance, RBF MMD, sliced Wasserstein, coverage.
LPIPS lives in :mod:`dmvae.lpips` (class ``LPIPS``). Protocols: ``docs/evaluation.md``.
"""

from dmvae.metrics import distribution, fid, image
from dmvae.metrics.distribution import (
    coverage,
    energy_distance,
    median_bandwidth,
    rbf_mmd,
    sliced_wasserstein,
)
from dmvae.metrics.fid import (
    FIDStats,
    InceptionV3Features,
    InceptionWeightsError,
    StreamingStats,
    find_inception_weights,
    frechet_distance,
    inception_score,
    load_reference_stats,
    save_reference_stats,
)
from dmvae.metrics.image import psnr, ssim, to_uint8, uint8_to_float
from dmvae.metrics.precision_recall import precision_recall

# Each submodule's __all__ is the one list of its public names.
__all__ = sorted({*distribution.__all__, *fid.__all__, *image.__all__, "precision_recall"})
