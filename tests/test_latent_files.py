"""dmvae.latent_files: the latents file of `dmvae encode` / `dmvae decode`, from Python."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dmvae.latent_files import load_latents, save_latents


def test_round_trip_keeps_latents_labels_and_metadata(tmp_path) -> None:
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    path = save_latents(tmp_path / "z.safetensors", z, normalized=False, files=["a.png", "b/c.png", "d.jpg"],
                        labels=[0, 1, 1], classes=["cat", "dog"], latent_mean=0.5, latent_scale=2.0, image_size=32)
    got = load_latents(path)
    assert got.latents.dtype == torch.float32 and torch.equal(got.latents, z.float())
    assert got.normalized is False and got.files == ["a.png", "b/c.png", "d.jpg"]
    assert got.labels.tolist() == [0, 1, 1] and got.classes == ["cat", "dog"]
    assert (got.latent_mean, got.latent_scale, got.image_size) == (0.5, 2.0, 32)


def test_a_bare_tensor_file_reads_with_defaults(tmp_path) -> None:
    save_file({"z": torch.zeros(2, 1, 1, 1)}, str(tmp_path / "bare.safetensors"))
    got = load_latents(tmp_path / "bare.safetensors", key="z")
    assert got.latents.shape == (2, 1, 1, 1) and got.normalized is True and got.files is None and got.labels is None
    with pytest.raises(ValueError, match=r"has no tensor 'latents'; found \['z'\]"):
        load_latents(tmp_path / "bare.safetensors")


@pytest.mark.parametrize("meta,message", [
    ({"normalized": "yes"}, "'normalized' is not valid JSON"),
    ({"normalized": "1"}, "'normalized' must be true or false"),
    ({"files": json.dumps(["only-one"])}, "'files' must list 2 names"),
])
def test_invalid_metadata_names_the_file_and_field(tmp_path, meta, message) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"latents": torch.zeros(2, 1, 1, 1)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=message):
        load_latents(path)


def test_save_refuses_inconsistent_inputs(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        save_latents(tmp_path / "x.safetensors", torch.zeros(2, 3), normalized=True)
    with pytest.raises(ValueError, match="files must name the 2 latents"):
        save_latents(tmp_path / "x.safetensors", torch.zeros(2, 1, 1, 1), normalized=True, files=["a"])
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        save_latents(tmp_path / "x.safetensors", torch.zeros(2, 1, 1, 1), normalized=True, labels=[1, 2, 3])
    assert not (tmp_path / "x.safetensors").exists()
