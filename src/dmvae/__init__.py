"""dmvae: the Distribution-Matching VAE (arXiv 2512.07778) and the pieces around it.

Public names are imported lazily (PEP 562), so ``import dmvae`` stays cheap and has no side
effects; ``from dmvae import DMVAE`` imports the autoencoder module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dmvae._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # autoencoder
    "DMVAE": "dmvae.autoencoder",
    "DMVAEConfig": "dmvae.autoencoder",
    "DMVAEOutput": "dmvae.autoencoder",
    "list_presets": "dmvae.autoencoder",
    # latent diffusion
    "LatentDiT": "dmvae.dit",
    "LatentDiTConfig": "dmvae.dit",
    "create_model": "dmvae._registry",
    "list_models": "dmvae._registry",
    "FlowMatching": "dmvae.transport",
    "FlowMatchingConfig": "dmvae.transport",
    "shift_time": "dmvae.transport",
    "sample": "dmvae.samplers",
    "time_grid": "dmvae.samplers",
    "generate_npz": "dmvae.generate",
    "balanced_labels": "dmvae.generate",
    # reference priors and the distribution-matching loss
    "ReferencePrior": "dmvae.priors",
    "GaussianPrior": "dmvae.priors",
    "GaussianMixturePrior": "dmvae.priors",
    "SamplesPrior": "dmvae.priors",
    "SShape2D": "dmvae.priors",
    "LearnedPrior": "dmvae.priors",
    "FeaturePrior": "dmvae.priors",
    "DiffusionNoisePrior": "dmvae.priors",
    "fit_reference_model": "dmvae.priors",
    "register_prior": "dmvae.priors",
    "create_prior": "dmvae.priors",
    "list_priors": "dmvae.priors",
    "DistributionMatchingLoss": "dmvae.dm_loss",
    "TRangeAnneal": "dmvae.dm_loss",
    "DMHealth": "dmvae.dm_health",
    "HealthThresholds": "dmvae.dm_health",
    # evaluation
    "evaluate_reconstruction": "dmvae.evaluation",
    "evaluate_generation": "dmvae.evaluation",
    # weights
    "CheckpointError": "dmvae.hub",
    "HubMixin": "dmvae.hub",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from dmvae.autoencoder import DMVAE, DMVAEConfig, DMVAEOutput, list_presets
    from dmvae.dm_health import DMHealth, HealthThresholds
    from dmvae.dm_loss import DistributionMatchingLoss, TRangeAnneal
    from dmvae.evaluation import evaluate_generation, evaluate_reconstruction
    from dmvae.priors import (
        DiffusionNoisePrior,
        FeaturePrior,
        GaussianMixturePrior,
        GaussianPrior,
        LearnedPrior,
        ReferencePrior,
        SamplesPrior,
        SShape2D,
        create_prior,
        fit_reference_model,
        list_priors,
        register_prior,
    )
    from dmvae._registry import create_model, list_models
    from dmvae.dit import LatentDiT, LatentDiTConfig
    from dmvae.generate import balanced_labels, generate_npz
    from dmvae.files import CheckpointError
    from dmvae.hub import HubMixin
    from dmvae.samplers import sample, time_grid
    from dmvae.transport import FlowMatching, FlowMatchingConfig, shift_time


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dmvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
