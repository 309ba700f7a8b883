"""`dmvae eval-recon` / `dmvae eval-gen` end to end, with a random-weight Inception file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from dmvae.cli import main
from dmvae.npz import save_npz_images
from dmvae.metrics import InceptionV3Features


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """The Inception-v3 architecture with random weights, saved like the real 2015-12-05 file.

    Random BatchNorm statistics (mean 0, var 1) shrink activations to ~1e-7 by the pool layer, which
    makes every image look alike; so the BN statistics are set from one batch of random images
    first, giving features that differ between images as the real network's do."""
    path = tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-6726825d.pth"
    torch.manual_seed(0)
    net = InceptionV3Features(pretrained=False).net
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        net(
            torch.randint(
                0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
            )
        )
    net.eval()
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photos():
    imgs = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    return [np.asarray(Image.fromarray(i).resize((48, 48), Image.BICUBIC)) for i in imgs]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("imgs")
    for k, img in enumerate(photos):
        Image.fromarray(img).save(root / f"{k}.png")
    return root


@pytest.mark.slow  # end to end: Inception over npz files
def test_eval_gen_json(tmp_path, photos, inception_file, capsys):
    real = np.stack(photos[:3])  # (3, 48, 48, 3)
    fake = np.ascontiguousarray(real[:, ::-1])  # upside-down "samples"
    save_npz_images(tmp_path / "samples.npz", fake)
    save_npz_images(tmp_path / "ref.npz", real)
    out = tmp_path / "gen.json"
    rc = main(
        [
            "eval-gen",
            str(tmp_path / "samples.npz"),
            "--ref",
            str(tmp_path / "ref.npz"),
            "--inception",
            str(inception_file),
            "--batch-size",
            "2",
            "--is-splits",
            "1",
            "--k",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_samples"] == 3 and res["num_reference_images"] == 3
    assert res["reference_stats_from"] == "images"
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    assert res["inception_score"] >= 1.0 and 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0
    assert "fid" in capsys.readouterr().out  # human-readable summary too


@pytest.mark.slow  # end to end: a DMVAE over an image folder, Inception, LPIPS
def test_eval_recon_dmvae_json_to_stdout(tmp_path, image_dir, inception_file, capsys):
    from dmvae.autoencoder import DMVAE

    torch.manual_seed(0)
    DMVAE("dmvae-tiny").save_pretrained(tmp_path / "tiny")
    rc = main(
        [
            "eval-recon",
            "--model",
            str(tmp_path / "tiny"),
            "--num-workers",
            "1",
            "--data",
            str(image_dir),
            "--image-size",
            "32",
            "--num",
            "3",
            "--batch-size",
            "2",
            "--inception",
            str(inception_file),
            "--device",
            "cpu",
            "--quiet",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)  # --json: nothing but the JSON document on stdout
    assert res["num_images"] == 3 and res["image_size"] == 32 and res["model"] == str(tmp_path / "tiny")
    assert res["latents"]["latent_channels"] == 8 and len(res["latents"]["latent_channel_std"]) == 8
    assert np.isfinite(res["rfid"]) and res["rfid"] > 0 and np.isfinite(res["psnr"]) and res["lpips"] is None


def test_missing_inception_weights_is_a_clear_error(tmp_path, image_dir, monkeypatch, capsys):
    monkeypatch.delenv("DMVAE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rc = main(
        ["eval-recon", "--model", "identity", "--data", str(image_dir), "--device", "cpu", "--quiet"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "Inception-v3" in err and "DMVAE_INCEPTION_WEIGHTS" in err and "--inception" in err


def test_eval_gen_bad_reference(tmp_path, capsys):
    save_npz_images(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", something=np.zeros(2))
    rc = main(
        [
            "eval-gen",
            str(tmp_path / "s.npz"),
            "--ref",
            str(tmp_path / "ref.npz"),
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert rc == 1
    assert "found keys ['something']" in capsys.readouterr().err
