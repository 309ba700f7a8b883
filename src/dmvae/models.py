"""Every model family by name: the one :func:`create_model` / :func:`list_models`.

Importing this module imports each model family (:mod:`dmvae.autoencoder`, :mod:`dmvae.dit`), whose
presets and classes are then in the registries of :mod:`dmvae._registry`; names are looked up in
any case, and an unknown one says which known name is closest::

    dmvae.list_models("LightningDiT-*")
    dmvae.create_model("dmvae-tiny")                        # a DMVAE
    dmvae.create_model("LightningDiT-XL/1", num_classes=10)  # a LatentDiT
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dmvae import autoencoder, dit
from dmvae._registry import MODEL_CLASSES, MODELS

__all__ = ["FAMILIES", "create_model", "list_models", "model_class", "model_config"]

#: The model classes, one per family.
FAMILIES: tuple[type[nn.Module], ...] = (autoencoder.DMVAE, dit.LatentDiT)


def list_models(pattern: str | None = None) -> list[str]:
    """Every model preset name (autoencoders and LatentDiTs), sorted; ``pattern`` as in timm,
    ignoring case (``list_models("LightningDiT-*")``)."""
    return MODELS.names(pattern)


def model_config(name: str, **overrides: Any) -> Any:
    """The config of preset ``name`` with fields overridden (an unknown name raises
    :class:`~dmvae._registry.UnknownNameError` with "did you mean")."""
    config = MODELS.get(name)()
    return config.replace(**overrides) if overrides else config


def model_class(name_or_config: Any) -> type[nn.Module]:
    """The model class called ``name`` (``"DMVAE"``, ``"LatentDiT"``) or built by a config."""
    name = name_or_config if isinstance(name_or_config, str) else type(name_or_config).model
    return MODEL_CLASSES.get(name)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a randomly initialised model from a preset, timm-style::

        create_model("dmvae-tiny")                       # a DMVAE
        create_model("LightningDiT-XL/1", num_classes=10)  # a LatentDiT

    ``overrides`` replace config fields. Weights come from ``Model.from_pretrained``.
    """
    config = model_config(name, **overrides)
    return model_class(config)(config)
