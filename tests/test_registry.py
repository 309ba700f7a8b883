"""dmvae._registry: the one name -> object mechanism; create_model / list_models over every family."""

from __future__ import annotations

import pytest

import dmvae
from dmvae import DMVAE, DMVAEConfig, LatentDiT, LatentDiTConfig
from dmvae._registry import MODELS, Registry, UnknownNameError


def test_registry_register_get_names_and_errors() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b", 2)

    @reg.register("a")
    def _a() -> int:
        return 1

    assert reg.names() == ["a", "b"] and reg.get("b") == 2 and reg.get("a") is _a
    assert reg.names("b*") == ["b"] and "a" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="widget 'b' is already registered"):
        reg.register("b", 3)
    reg.register("b", 3, override=True)
    assert reg.get("b") == 3
    with pytest.raises(UnknownNameError, match=r"unknown widget 'B' \(did you mean 'b'\?\); known: \['a', 'b'\]"):
        reg.get("B")
    with pytest.raises(KeyError):  # also a KeyError (and a ValueError) for callers that catch those
        reg.get("zzz")
    with pytest.raises(TypeError, match="widget name must be a non-empty string, got int 123"):
        reg.register(123, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int 123"):
        reg.get(123)  # type: ignore[arg-type]
    lower: Registry[int] = Registry("prior", case_sensitive=False)
    lower.register("Gauss", 1)
    assert lower.get("GAUSS") == 1 and lower.names() == ["gauss"]


def test_create_model_and_list_models_cover_both_families() -> None:
    names = dmvae.list_models()
    assert {"dmvae-l", "dmvae-b", "dmvae-tiny", "LightningDiT-XL/1", "LightningDiT-Mini/1"} <= set(names)
    assert dmvae.list_models("dmvae-*") == ["dmvae-b", "dmvae-l", "dmvae-tiny"]
    assert isinstance(dmvae.create_model("dmvae-tiny"), DMVAE)
    dit = dmvae.create_model("LightningDiT-Mini/1", depth=1, num_classes=10)
    assert isinstance(dit, LatentDiT) and dit.config.depth == 1 and dit.config.num_classes == 10
    with pytest.raises(UnknownNameError, match=r"unknown model preset 'LightningDiT-XXL/1'; known: \[.*dmvae-l"):
        dmvae.create_model("LightningDiT-XXL/1")
    assert all(name in MODELS for name in names)


def test_family_specific_preset_lookups() -> None:
    assert DMVAEConfig.preset_names() == dmvae.list_presets() == ["dmvae-b", "dmvae-l", "dmvae-tiny"]
    assert "dmvae-l" not in LatentDiTConfig.preset_names()
    with pytest.raises(ValueError, match=r"'LightningDiT-XL/1' is a LatentDiT preset, not a DMVAE one"):
        DMVAE("LightningDiT-XL/1")
    with pytest.raises(ValueError, match=r"'dmvae-l' is a DMVAE preset, not a LatentDiT one"):
        LatentDiTConfig.from_preset("dmvae-l")
