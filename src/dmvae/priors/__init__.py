"""Reference distributions p_r(z) for the distribution-matching loss (paper Table 1).

``create_prior(name, **kw)`` builds a registered prior; ``list_priors()`` names them (built-ins
plus plugins from the ``dmvae.priors`` entry-point group).
"""

from dmvae.priors.analytic import GaussianMixturePrior, GaussianPrior
from dmvae.priors.base import (
    ENTRY_POINT_GROUP,
    ReferencePrior,
    create_prior,
    list_priors,
    register_prior,
)
from dmvae.priors.features import DiffusionNoisePrior, FeaturePrior, backbone_features
from dmvae.priors.learned import LearnedPrior, fit_reference_model
from dmvae.priors.samples import SamplesPrior, empirical_velocity
from dmvae.priors.sshape import SShape2D, sshape_numpy

__all__ = [
    "ENTRY_POINT_GROUP",
    "DiffusionNoisePrior",
    "FeaturePrior",
    "GaussianMixturePrior",
    "GaussianPrior",
    "LearnedPrior",
    "ReferencePrior",
    "SShape2D",
    "SamplesPrior",
    "backbone_features",
    "create_prior",
    "empirical_velocity",
    "fit_reference_model",
    "list_priors",
    "register_prior",
    "sshape_numpy",
]
