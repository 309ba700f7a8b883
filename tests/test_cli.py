"""The `dmvae` command line: info, convert, reconstruct, encode, decode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae.cli import main


def run_cli(*args: str) -> int:
    return main(list(args))


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = capsys.readouterr().out
    for cmd in ("info", "convert", "reconstruct", "encode", "decode"):
        assert cmd in out


def test_dunder_main_runs_the_cli(monkeypatch, capsys) -> None:
    """``python -m dmvae`` in process: dmvae/__main__.py hands argv to the CLI and exits with its code."""
    import runpy

    import dmvae

    monkeypatch.setattr(sys, "argv", ["dmvae", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("dmvae.__main__", run_name="__main__")
    assert e.value.code in (0, None) and capsys.readouterr().out.strip() == f"dmvae {dmvae.__version__}"


@pytest.mark.slow  # a fresh interpreter
def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dmvae", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("dmvae ")


def test_info_release_preset_matches_manifest(capsys, fixtures_dir: Path) -> None:
    assert run_cli("info", "dmvae-l", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    index = json.loads((fixtures_dir / "manifests" / "index.json").read_text())
    assert info["parameters"]["total"] == index["files"]["vae_large_z32.json"]["num_parameters"]
    assert info["latent_shape"] == [32, 16, 16]
    assert run_cli("info", "dmvae-l") == 0
    text = capsys.readouterr().out
    assert "32x16x16" in text and "0.1763" in text


def test_info_unknown_source_names_the_known_presets(capsys) -> None:
    assert run_cli("info", "dmvae-xxl") == 1
    err = capsys.readouterr().err
    assert "dmvae-xxl" in err and "dmvae-l" in err


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixtures_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny"
    assert main(["convert", str(fixtures_dir / "vae" / "vae.pt"), str(out), "--config", "dmvae-tiny", "--ema"]) == 0
    return out


def test_convert_writes_our_format_with_the_chosen_weights(converted: Path, fixtures_dir: Path) -> None:
    from safetensors.torch import load_file

    ref = torch.load(fixtures_dir / "vae" / "vae.pt", weights_only=True)
    ours = load_file(converted / "model.safetensors")
    assert set(ours) == set(ref["vae_ema"])
    for k, v in ref["vae_ema"].items():
        assert torch.equal(ours[k], v), k
    assert json.loads((converted / "config.json").read_text())["z_channels"] == 8


def test_convert_rejects_files_that_are_not_reference_checkpoints(tmp_path: Path, capsys) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    assert run_cli("convert", str(tmp_path / "x.pt"), str(tmp_path / "o"), "--config", "dmvae-tiny") == 1
    assert "vae_wo_ddp" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    skdata = pytest.importorskip("skimage.data")
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(skdata.astronaut()).save(d / "astronaut.png")
    Image.fromarray(skdata.coffee()).save(d / "coffee.jpg")
    return d


def test_reconstruct_encode_decode_round_trip(converted: Path, photos: Path, tmp_path: Path, capsys) -> None:
    rec = tmp_path / "rec"
    assert run_cli("reconstruct", str(photos), "-o", str(rec), "--model", str(converted), "--batch-size", "1") == 0
    assert sorted(p.name for p in rec.iterdir()) == ["astronaut.png", "coffee.png"]
    assert Image.open(rec / "coffee.png").size == (256, 256)
    assert "PSNR" in capsys.readouterr().out

    lat = tmp_path / "lat.safetensors"
    assert run_cli("encode", str(photos), "-o", str(lat), "--model", str(converted)) == 0
    from safetensors import safe_open

    with safe_open(lat, framework="pt") as f:
        z = f.get_tensor("latents")
        meta = f.metadata()
    assert tuple(z.shape) == (2, 8, 16, 16) and torch.isfinite(z).all()
    assert json.loads(meta["normalized"]) is True

    dec = tmp_path / "dec"
    assert run_cli("decode", str(lat), "-o", str(dec), "--model", str(converted)) == 0
    assert sorted(p.name for p in dec.iterdir()) == ["astronaut.png", "coffee.png"]
    # decoding the latents gives the same pixels as `reconstruct` (same model, same crop)
    a = np.asarray(Image.open(dec / "coffee.png"), dtype=np.int16)
    b = np.asarray(Image.open(rec / "coffee.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_missing_inputs_are_clear_errors(converted: Path, tmp_path: Path, capsys) -> None:
    assert run_cli("reconstruct", str(tmp_path / "none.png"), "-o", str(tmp_path), "--model", str(converted)) == 1
    assert "none.png" in capsys.readouterr().err
    assert run_cli("decode", str(tmp_path / "none.safetensors"), "-o", str(tmp_path), "--model", str(converted)) == 1
    assert "none.safetensors" in capsys.readouterr().err
