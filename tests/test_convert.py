"""dmvae.convert: layout detection, state-dict selection and conversion defaults (issue 13 step 6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmvae import DMVAE, LatentDiT
from dmvae.conversion import convert_checkpoint
from dmvae.convert import AUTOENCODER, DIT, detect_layout, select_state_dict
from dmvae.files import CheckpointError

DIT_CFG = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)


def _dit_release(tmp_path: Path) -> tuple[Path, LatentDiT, LatentDiT]:
    torch.manual_seed(0)
    raw, ema = LatentDiT(DIT_CFG), LatentDiT(DIT_CFG)
    path = tmp_path / "ep800.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}}, path)
    return path, raw, ema


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_convert_release_dit_defaults_to_ema_like_from_pretrained(tmp_path: Path) -> None:
    path, raw, ema = _dit_release(tmp_path)
    model, out, used_ema = convert_checkpoint(path, tmp_path / "out", DIT_CFG)
    assert used_ema is True
    converted = LatentDiT.from_pretrained(out)
    direct = LatentDiT.from_pretrained(path, config=DIT_CFG)  # the default of from_pretrained
    assert _same(converted, ema) and _same(direct, ema) and not _same(converted, raw)
    # asking for the raw weights still works
    _, out_raw, used = convert_checkpoint(path, tmp_path / "raw", DIT_CFG, use_ema=False)
    assert used is False and _same(LatentDiT.from_pretrained(out_raw), raw)


def test_convert_autoencoder_defaults_to_raw_like_from_pretrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    raw, ema = DMVAE("dmvae-tiny"), DMVAE("dmvae-tiny")
    path = tmp_path / "vae.pt"
    torch.save({"vae_wo_ddp": raw.state_dict(), "vae_ema": ema.state_dict()}, path)
    _, out, used_ema = convert_checkpoint(path, tmp_path / "out", "dmvae-tiny")
    assert used_ema is False
    assert _same(DMVAE.from_pretrained(out), raw)
    assert _same(DMVAE.from_pretrained(path, config="dmvae-tiny"), raw)


def test_convert_refuses_existing_model_before_reading(tmp_path: Path) -> None:
    path, _, _ = _dit_release(tmp_path)
    out = tmp_path / "out"
    convert_checkpoint(path, out, DIT_CFG)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a model"):
        convert_checkpoint(tmp_path / "does-not-exist.pt", out, DIT_CFG)  # refused before the read
    convert_checkpoint(path, out, DIT_CFG, use_ema=False, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before


def test_detect_layout_and_select() -> None:
    w = {"w": torch.ones(1)}
    assert detect_layout({"vae_wo_ddp": w}) is AUTOENCODER
    assert detect_layout({"ema": w, "model": w}) is DIT
    with pytest.raises(CheckpointError, match="not a reference checkpoint.*found top-level keys"):
        detect_layout({"foo": 1}, "x.pt")
    with pytest.raises(CheckpointError, match=r"This is a LatentDiT checkpoint.*LatentDiT.from_pretrained"):
        select_state_dict(AUTOENCODER, {"model": w, "ema": w}, None, "ep800.pt")
    assert select_state_dict(DIT, w, None, "bare.pt") == w  # nothing to choose: taken as is
    with pytest.raises(CheckpointError, match="no EMA weights"):
        select_state_dict(DIT, w, True, "bare.pt")
    assert select_state_dict(DIT, {"ema": {**w, "_meta": torch.zeros(1)}}, None, "x") == w
