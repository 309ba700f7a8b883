"""dmvae: the Distribution-Matching VAE (arXiv 2512.07778) and the pieces around it.

Public names are imported lazily (PEP 562), so ``import dmvae`` stays cheap and has no side
effects; ``from dmvae import DMVAE`` imports the autoencoder module on first use.
"""

from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING as _TYPE_CHECKING

from dmvae._version import __version__

# public name -> submodule of dmvae that defines it
_EXPORTS: dict[str, str] = {
    # autoencoder
    "DMVAE": "autoencoder",
    "DMVAEConfig": "autoencoder_config",
    "DMVAEOutput": "autoencoder",
    # latent diffusion
    "LatentDiT": "dit",
    "LatentDiTConfig": "dit_config",
    "create_model": "models",
    "list_models": "models",
    "FlowMatching": "transport",
    "FlowMatchingConfig": "transport",
    "shift_time": "transport",
    "sample": "samplers",
    "time_grid": "samplers",
    "generate_npz": "generate",
    "balanced_labels": "generate",
    # reference priors and the distribution-matching loss
    "ReferencePrior": "priors",
    "GaussianPrior": "priors",
    "GaussianMixturePrior": "priors",
    "SamplesPrior": "priors",
    "SShape2D": "priors",
    "LearnedPrior": "priors",
    "FeaturePrior": "priors",
    "DiffusionNoisePrior": "priors",
    "fit_reference_model": "priors",
    "register_prior": "priors",
    "create_prior": "priors",
    "list_priors": "priors",
    "DistributionMatchingLoss": "dm_loss",
    "TRangeAnneal": "dm_loss",
    "DMHealth": "dm_health",
    "HealthThresholds": "dm_health",
    # evaluation
    "evaluate_reconstruction": "evaluation",
    "evaluate_generation": "evaluation",
    # weights
    "CheckpointError": "files",
    "HubMixin": "hub",
}

__all__ = ["__version__", *_EXPORTS]

if _TYPE_CHECKING:  # pragma: no cover
    from dmvae.autoencoder import DMVAE, DMVAEOutput
    from dmvae.autoencoder_config import DMVAEConfig
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
    from dmvae.dit import LatentDiT
    from dmvae.dit_config import LatentDiTConfig
    from dmvae.models import create_model, list_models
    from dmvae.generate import balanced_labels, generate_npz
    from dmvae.files import CheckpointError
    from dmvae.hub import HubMixin
    from dmvae.samplers import sample, time_grid
    from dmvae.transport import FlowMatching, FlowMatchingConfig, shift_time


def _submodule(name: str) -> _ModuleType:
    """Import one exporting submodule with a plain import statement, so that tools reading the
    imports (the import contract) see it; no ``importlib`` string lookups."""
    match name:
        case "autoencoder":
            from dmvae import autoencoder as module
        case "autoencoder_config":
            from dmvae import autoencoder_config as module
        case "dit":
            from dmvae import dit as module
        case "dit_config":
            from dmvae import dit_config as module
        case "models":
            from dmvae import models as module
        case "transport":
            from dmvae import transport as module
        case "samplers":
            from dmvae import samplers as module
        case "generate":
            from dmvae import generate as module
        case "priors":
            from dmvae import priors as module
        case "dm_loss":
            from dmvae import dm_loss as module
        case "dm_health":
            from dmvae import dm_health as module
        case "evaluation":
            from dmvae import evaluation as module
        case "files":
            from dmvae import files as module
        case "hub":
            from dmvae import hub as module
        case _:  # pragma: no cover - _EXPORTS names only the modules above
            raise AssertionError(name)
    return module


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dmvae' has no attribute {name!r}")
    value = getattr(_submodule(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names (and the module's dunders), not the helpers of this file."""
    return sorted({*__all__, *(n for n in globals() if n.startswith("__") and n.endswith("__"))})
