"""dmvae._registry and dmvae.models: the one name -> object mechanism; create_model / list_models
over every family; presets written one way; did-you-mean everywhere."""

from __future__ import annotations

import pytest

import dmvae
from dmvae import DMVAE, DMVAEConfig, LatentDiT, LatentDiTConfig
from dmvae._registry import (
    CONFIG_CLASSES,
    MODEL_CLASSES,
    MODELS,
    Registry,
    UnknownNameError,
)
from dmvae.models import model_class


def test_registry_register_get_names_and_errors() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b", 2)

    @reg.register("Alpha")
    def _a() -> int:
        return 1

    assert reg.names() == ["Alpha", "b"] and reg.get("b") == 2 and reg.get("alpha") is _a
    assert reg.get("ALPHA") is _a and reg.canonical("aLpHa") == "Alpha"  # any case, one spelling
    assert reg.names("b*") == ["b"] and reg.names("al*") == ["Alpha"] and "B" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="widget 'b' is already registered"):
        reg.register("B", 3)  # the same name in another case is the same name
    reg.register("B", 3, override=True)
    assert reg.get("b") == 3 and reg.names() == ["Alpha", "B"]
    with pytest.raises(UnknownNameError, match=r"unknown widget 'Alpah' \(did you mean 'Alpha'\?\); known: \['Alpha', 'B'\]"):
        reg.get("Alpah")
    with pytest.raises(KeyError, match=r"unknown widget 'zzz'; known"):  # nothing close: no suggestion
        reg.get("zzz")
    assert not issubclass(UnknownNameError, ValueError)
    with pytest.raises(TypeError, match="widget name must be a non-empty string, got int 123"):
        reg.register(123, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int 123"):
        reg.get(123)  # type: ignore[arg-type]
    assert reg.unregister("alpha") is _a and "Alpha" not in reg


def test_create_model_and_list_models_cover_both_families() -> None:
    names = dmvae.list_models()
    assert {"dmvae-l", "dmvae-b", "dmvae-tiny", "LightningDiT-XL/1", "LightningDiT-Mini/1"} <= set(names)
    assert dmvae.list_models("dmvae-*") == ["dmvae-b", "dmvae-l", "dmvae-tiny"]
    assert dmvae.list_models("lightningdit-xl/*") == ["LightningDiT-XL/1", "LightningDiT-XL/2"]
    assert isinstance(dmvae.create_model("DMVAE-Tiny"), DMVAE)  # case-insensitive
    dit = dmvae.create_model("LightningDiT-Mini/1", depth=1, num_classes=10)
    assert isinstance(dit, LatentDiT) and dit.config.depth == 1 and dit.config.num_classes == 10
    with pytest.raises(UnknownNameError, match=r"unknown model preset 'LightningDiT-XXL/1' \(did you mean 'LightningDiT-XL/1'\?\)"):
        dmvae.create_model("LightningDiT-XXL/1")
    assert all(name in MODELS for name in names)


def test_classes_are_registered_not_named_by_strings() -> None:
    assert MODEL_CLASSES.get("DMVAE") is DMVAE and MODEL_CLASSES.get("latentdit") is LatentDiT
    assert model_class(DMVAEConfig()) is DMVAE and model_class(LatentDiTConfig()) is LatentDiT
    assert DMVAEConfig.model == "DMVAE" and LatentDiTConfig.model == "LatentDiT"
    assert CONFIG_CLASSES.get("DMVAEConfig") is DMVAEConfig and CONFIG_CLASSES.get("latentditconfig") is LatentDiTConfig


def test_presets_are_one_table_per_family_and_build_fresh_configs() -> None:
    from dmvae import autoencoder_config, dit_config

    assert sorted(autoencoder_config.PRESETS) == DMVAEConfig.preset_names()
    assert sorted(dit_config.PRESETS) == LatentDiTConfig.preset_names()
    a, b = DMVAEConfig.from_preset("dmvae-tiny"), DMVAEConfig.from_preset("dmvae-tiny")
    a.encoder_kwargs["depth"] = 99  # a preset's dict field is not shared between configs
    assert b.encoder_kwargs["depth"] == 2 and autoencoder_config.PRESETS["dmvae-tiny"]["encoder_kwargs"]["depth"] == 2
    assert LatentDiTConfig.from_preset("lightningdit-xl/1").depth == 28


def test_family_specific_preset_lookups() -> None:
    assert DMVAEConfig.preset_names() == dmvae.list_models("dmvae-*") == ["dmvae-b", "dmvae-l", "dmvae-tiny"]
    assert "dmvae-l" not in LatentDiTConfig.preset_names()
    with pytest.raises(KeyError, match=r"'LightningDiT-XL/1' is a LatentDiT preset, not a DMVAE one"):
        DMVAE("LightningDiT-XL/1")
    with pytest.raises(KeyError, match=r"'dmvae-l' is a DMVAE preset, not a LatentDiT one"):
        LatentDiTConfig.from_preset("DMVAE-L")
    with pytest.raises(KeyError, match=r"unknown DMVAE preset 'dmvae-xl' \(did you mean 'dmvae-l'\?\)"):
        DMVAEConfig.from_preset("dmvae-xl")
