"""CLI outputs: never overwritten without --overwrite (checked before the work), unwritable places
and full disks reported in one line naming the path, latent-file metadata (labels, relative names,
invalid JSON, hostile names), the upscaling note, eval-recon without Inception weights."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from dmvae import autoencoder
from dmvae.autoencoder import DMVAE
from dmvae.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny") / "model"
    DMVAE("dmvae-tiny").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """<root>/<class>/<name>.png, 2 classes, 48x40 images."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for cls, names in (("cat", ["a", "b"]), ("dog", ["c"])):
        (root / cls).mkdir()
        for n in names:
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cls / f"{n}.png")
    return root


def _run(*args: str) -> int:
    return main([*args, "--device", "cpu", "--quiet"])


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads the model (the check must come before the work)."""
    monkeypatch.setattr(autoencoder.DMVAE, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("the model was loaded")))  # fmt: skip


# ---- never overwrite without being asked, checked before the work --------------------------------


def test_reconstruct_refuses_existing_pngs(classes, tmp_path, no_model, capsys) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "b.png").write_bytes(b"mine")  # the class sub-folders are kept: cat/b.jpg -> cat/b.png
    assert _run("reconstruct", str(classes), "-o", str(tmp_path), "--image-size", "32") == 1
    assert "cat/b.png" in capsys.readouterr().err and (tmp_path / "cat" / "b.png").read_bytes() == b"mine"


def test_encode_refuses_an_existing_file(classes, tmp_path, no_model, capsys) -> None:
    (tmp_path / "z.safetensors").write_bytes(b"mine")
    assert _run("encode", str(classes), "-o", str(tmp_path / "z.safetensors")) == 1
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "z.safetensors").read_bytes() == b"mine"


def test_decode_refuses_existing_pngs(tmp_path, no_model, capsys) -> None:
    save_file({"latents": torch.zeros(2, 8, 2, 2)}, tmp_path / "z.safetensors",
              metadata={"files": json.dumps(["p.png", "q.png"])})  # fmt: skip
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "q.png").write_bytes(b"mine")
    assert _run("decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "out")) == 1
    assert "q.png" in capsys.readouterr().err and (tmp_path / "out" / "q.png").read_bytes() == b"mine"


def test_convert_refuses_a_directory_holding_a_model(tiny, tmp_path, capsys, fixtures_dir) -> None:
    out = tmp_path / "conv"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["convert", str(fixtures_dir / "vae" / "vae.pt"), str(out), "--config", "dmvae-tiny"]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "config.json").read_text() == "{}"
    assert main(["convert", str(fixtures_dir / "vae" / "vae.pt"), str(out), "--config", "dmvae-tiny",
                 "--overwrite"]) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())["z_channels"] == 8


def test_eval_results_file_is_not_overwritten(classes, tmp_path, capsys) -> None:
    (tmp_path / "r.json").write_text("mine")
    assert _run("eval-recon", "--model", "identity", "--data", str(classes), "--no-fid", "--image-size", "32",
                "-o", str(tmp_path / "r.json")) == 1  # fmt: skip
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "r.json").read_text() == "mine"


# ---- unwritable places, full disks ----------------------------------------------------------------


def test_output_under_a_file_is_one_line_naming_it(classes, tmp_path, no_model, capsys) -> None:
    (tmp_path / "plain").write_text("x")
    assert _run("encode", str(classes), "-o", str(tmp_path / "plain" / "z.safetensors")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "plain") in err and "Traceback" not in err


def test_read_only_directory_is_refused_before_the_work(classes, tmp_path, no_model, monkeypatch, capsys) -> None:
    import os

    from dmvae.cli import _common

    real = os.access
    monkeypatch.setattr(_common.os, "access",
                        lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))  # fmt: skip
    (tmp_path / "ro").mkdir()
    assert _run("reconstruct", str(classes), "-o", str(tmp_path / "ro"), "--image-size", "32") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "ro") in err and "permission" in err


def test_full_disk_during_the_write_is_one_line_naming_the_file(classes, tiny, tmp_path, monkeypatch, capsys):
    from dmvae import latent_files

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, like a failing write()

    monkeypatch.setattr(latent_files, "atomic_save_safetensors", full)  # the latents file's writer
    out = tmp_path / "z.safetensors"
    assert _run("encode", str(classes), "-o", str(out), "--model", str(tiny), "--image-size", "32") == 1
    err = capsys.readouterr().err
    assert err.strip() == f"dmvae encode: error: No space left on device: {out}"


# ---- latent files ---------------------------------------------------------------------------------


def test_encode_writes_labels_and_relative_names_decode_reads_them(classes, tiny, tmp_path) -> None:
    lat = tmp_path / "z.safetensors"
    assert _run("encode", str(classes), "-o", str(lat), "--model", str(tiny), "--image-size", "32") == 0
    with safe_open(lat, framework="pt") as f:
        meta = f.metadata()
        labels = f.get_tensor("labels")
    assert json.loads(meta["files"]) == ["cat/a.png", "cat/b.png", "dog/c.png"]
    assert json.loads(meta["classes"]) == ["cat", "dog"] and labels.tolist() == [0, 0, 1]
    assert _run("decode", str(lat), "-o", str(tmp_path / "dec"), "--model", str(tiny)) == 0
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["a.png", "b.png", "c.png"]


def test_flat_folder_has_no_labels(classes, tiny, tmp_path) -> None:
    lat = tmp_path / "z.safetensors"
    assert _run("encode", str(classes / "cat"), "-o", str(lat), "--model", str(tiny), "--image-size", "32") == 0
    with safe_open(lat, framework="pt") as f:
        assert "labels" not in f.keys() and json.loads(f.metadata()["files"]) == ["a.png", "b.png"]


def test_decode_sanitises_names_from_metadata(tiny, tmp_path) -> None:
    hostile = ["../../escape.png", "/etc/cron.d/x.png", "..", "a\\..\\..\\win.png", "\x00nul\n.png", ".hidden.png"]
    save_file({"latents": torch.zeros(len(hostile), 8, 2, 2)}, tmp_path / "z.safetensors",
              metadata={"files": json.dumps(hostile), "normalized": "false"})  # fmt: skip
    out = tmp_path / "deep" / "out"
    assert _run("decode", str(tmp_path / "z.safetensors"), "-o", str(out), "--model", str(tiny)) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert all(p.parent == Path("deep/out") for p in written) and len(written) == len(hostile)
    assert not any(p.name.startswith(".") for p in written)


def test_invalid_metadata_json_names_file_and_field(tiny, tmp_path, capsys) -> None:
    save_file({"latents": torch.zeros(1, 8, 2, 2)}, tmp_path / "z.safetensors", metadata={"files": "[oops"})
    assert _run("decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "o"), "--model", str(tiny)) == 1
    err = capsys.readouterr().err
    assert "z.safetensors" in err and "'files'" in err and "Traceback" not in err


def test_reconstruct_says_when_it_upscales(classes, tiny, tmp_path, capsys) -> None:
    assert _run("reconstruct", str(classes / "dog"), "-o", str(tmp_path), "--model", str(tiny), "--image-size", "64") == 0
    captured = capsys.readouterr()
    assert "48x40" in captured.err and "upscaled" in captured.err and "PSNR" in captured.out
    assert Image.open(tmp_path / "c.png").size == (64, 64)
    assert _run("reconstruct", str(classes / "dog"), "-o", str(tmp_path / "b"), "--model", str(tiny),
                "--image-size", "32") == 0  # fmt: skip
    assert "upscaled" not in capsys.readouterr().err


# ---- eval-recon without Inception weights ---------------------------------------------------------


def test_eval_recon_no_fid_needs_no_inception_weights(classes, tiny, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DMVAE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("DMVAE_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert _run("eval-recon", "--model", str(tiny), "--data", str(classes), "--no-fid", "--image-size", "32",
                "--json") == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["rfid"] is None and res["num_images"] == 3 and np.isfinite(res["psnr"]) and res["ssim"] < 1
    assert res["lpips"] is None and res["latents"]["latent_channels"] == 8  # LPIPS weights absent: skipped


def test_evaluate_reconstruction_restores_the_model_mode(classes) -> None:
    from dmvae.evaluation import evaluate_reconstruction

    model = DMVAE("dmvae-tiny").train()
    evaluate_reconstruction(model, classes, fid=False, image_size=32, progress=False)
    assert model.training
    model.eval()
    evaluate_reconstruction(model, classes, fid=False, image_size=32, progress=False)
    assert not model.training
