"""``DMVAETransformer2DModel``: a :class:`~dmvae.dit.LatentDiT` that is also a diffusers model.

It *is* a LatentDiT (a subclass: the same modules, state-dict keys, ``forward(x, t, y)`` with
t = 1 at the data, ``forward_with_cfg``, ``null_class``, and it works with
:func:`dmvae.samplers.sample`), and a diffusers ``ModelMixin`` / ``ConfigMixin`` (its config is
the :class:`~dmvae.dit.LatentDiTConfig` fields), so a ``DiffusionPipeline`` saves and loads it
with the other components. ``from_pretrained`` is strict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.utils import PushToHubMixin

from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.integrations.diffusers._loading import StrictLoadingMixin, copy_module

__all__ = ["DMVAETransformer2DModel"]

_FIELDS = tuple(f.name for f in dataclasses.fields(LatentDiTConfig))
_DEFAULTS = LatentDiTConfig()


class _LatentDiTFrozenConfig(FrozenDict):
    """diffusers' frozen config that also answers LatentDiTConfig's derived values
    (``grid_size``, ``head_dim``, ``out_channels``, ``mlp_hidden``), which LatentDiT reads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fields = {k: v for k, v in self.items() if k in _FIELDS}
        object.__setattr__(self, "_latent_dit_config", LatentDiTConfig.from_dict(fields))

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not config keys
        if name.startswith("__") or name == "_latent_dit_config":
            raise AttributeError(name)
        return getattr(self._latent_dit_config, name)


class DMVAETransformer2DModel(StrictLoadingMixin, LatentDiT, ModelMixin, ConfigMixin):
    """LightningDiT velocity model ``v(x_t, t, y)`` as a diffusers model.

    Args: the :class:`~dmvae.dit.LatentDiTConfig` fields (documented there). Call it like a
    LatentDiT: ``x`` (B, in_channels, input_size, input_size) normalised latents, ``t`` (B,) in
    [0, 1] (t = 0 noise, t = 1 data: the reverse of diffusers' sigma), ``y`` (B,) class labels
    (``num_classes`` is the null class); it returns the velocity ``x1 - x0`` as a tensor.
    """

    _supports_gradient_checkpointing = True
    # LatentDiT's HubMixin (dmvae's file layout) sits before diffusers' mixins in the MRO; where
    # both define a name, this class speaks diffusers (ModelMixin already wins save_pretrained /
    # from_pretrained / num_parameters by coming first).
    from_config = ConfigMixin.__dict__["from_config"]
    push_to_hub = PushToHubMixin.push_to_hub

    @register_to_config
    def __init__(
        self,
        input_size: int = _DEFAULTS.input_size,
        patch_size: int = _DEFAULTS.patch_size,
        in_channels: int = _DEFAULTS.in_channels,
        hidden_size: int = _DEFAULTS.hidden_size,
        depth: int = _DEFAULTS.depth,
        num_heads: int = _DEFAULTS.num_heads,
        mlp_ratio: float = _DEFAULTS.mlp_ratio,
        class_dropout_prob: float = _DEFAULTS.class_dropout_prob,
        num_classes: int = _DEFAULTS.num_classes,
        learn_sigma: bool = _DEFAULTS.learn_sigma,
        use_qknorm: bool = _DEFAULTS.use_qknorm,
        use_swiglu: bool = _DEFAULTS.use_swiglu,
        use_rope: bool = _DEFAULTS.use_rope,
        use_rmsnorm: bool = _DEFAULTS.use_rmsnorm,
        wo_shift: bool = _DEFAULTS.wo_shift,
        use_checkpoint: bool = _DEFAULTS.use_checkpoint,
    ) -> None:
        # LatentDiT.__init__ runs ModelMixin.__init__ (next in the MRO) through super().__init__()
        LatentDiT.__init__(self, self.latent_dit_config())

    # ---- the config: diffusers' frozen dict, readable as a LatentDiTConfig -----------------------

    @property  # type: ignore[override]
    def config(self) -> _LatentDiTFrozenConfig:
        return self._internal_dict

    @config.setter
    def config(self, value: LatentDiTConfig) -> None:
        # LatentDiT.__init__ assigns its dataclass; diffusers registered the same fields before
        # __init__ ran. Anything else would silently desynchronise the two.
        if not isinstance(value, LatentDiTConfig) or value != self.latent_dit_config():
            raise AttributeError("the config of a DMVAETransformer2DModel is set by its constructor")

    def register_to_config(self, **kwargs: Any) -> None:
        super().register_to_config(**kwargs)  # type: ignore[misc]
        self._internal_dict = _LatentDiTFrozenConfig(self._internal_dict)

    def latent_dit_config(self) -> LatentDiTConfig:
        """This model's configuration as a :class:`~dmvae.dit.LatentDiTConfig`."""
        return self._internal_dict._latent_dit_config

    # ---- conversion -------------------------------------------------------------------------------

    @classmethod
    def from_latent_dit(cls, dit: LatentDiT) -> DMVAETransformer2DModel:
        """A copy of ``dit`` (same weights, device, dtype and configuration)."""
        if not isinstance(dit, LatentDiT):
            raise TypeError(f"from_latent_dit expects a dmvae.LatentDiT, got {type(dit).__name__}")
        cfg = dit.config if isinstance(dit.config, LatentDiTConfig) else dit.latent_dit_config()
        model = copy_module(lambda: cls(**cfg.to_dict()), dit)
        model.gradient_checkpointing = dit.gradient_checkpointing
        return model

    def to_latent_dit(self) -> LatentDiT:
        """A plain :class:`~dmvae.dit.LatentDiT` copy of this model."""
        cfg = self.latent_dit_config()
        dit = copy_module(lambda: LatentDiT(cfg), self)
        dit.gradient_checkpointing = self.gradient_checkpointing
        return dit
