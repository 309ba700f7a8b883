"""`dmvae sample` and generate_npz: compatibility checks before sampling, fingerprinted resume,
seeded SDE noise in grid mode, validated numbers, the old spellings, no silent preset fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmvae import autoencoder, samplers
from dmvae.cli import main
from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.generate import generate_npz, sample_images

SAMPLER = dict(num_steps=2, method="euler")


class FakeVAE(torch.nn.Module):
    """decode(latents, normalize=True): a fixed map of the latent to a 3x8x8 image; an optional
    config says which latents it decodes (z_channels) like a DMVAE's."""

    def __init__(self, z_channels: int | None = None, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls, self.fail_after = 0, fail_after
        if z_channels is not None:
            self.config = type("Cfg", (), {"z_channels": z_channels, "image_size": 8, "patch_size": 2})()

    def decode(self, latents: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return torch.tanh(latents[:, :3].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def _dit(seed: int = 0) -> LatentDiT:
    torch.manual_seed(seed)
    model = LatentDiT(LatentDiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=32,
                                      depth=1, num_heads=2, num_classes=3))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def dit_dir(tmp_path: Path) -> Path:
    _dit().save_pretrained(tmp_path / "dit")
    return tmp_path / "dit"


@pytest.fixture
def fake_vae(monkeypatch) -> dict:
    made: dict = {"vae": FakeVAE(), "loads": 0}

    def load(cls, *a, **k):
        made["loads"] += 1
        return made["vae"]

    monkeypatch.setattr(autoencoder.DMVAE, "from_pretrained", classmethod(load))
    return made


def _sample(*args: str) -> int:
    return main(["sample", "--device", "cpu", "--steps", "2", "--quiet", *args])


# ---- compatibility before the first step ---------------------------------------------------------


def test_channel_mismatch_is_found_before_sampling(dit_dir, fake_vae, tmp_path, monkeypatch, capsys) -> None:
    fake_vae["vae"] = FakeVAE(z_channels=8)  # the DiT samples 4-channel latents
    calls = []
    monkeypatch.setattr(samplers, "sample", lambda *a, **k: calls.append(1))
    for out, extra in (("g.png", ["--classes", "0", "1"]), ("s.npz", ["--num-per-class", "1"])):
        assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / out), *extra) == 1
        err = capsys.readouterr().err
        assert "4-channel" in err and "z_channels=8" in err
    assert calls == []  # not a single sampling step
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "s.npz.shards").exists()


def test_class_ids_outside_the_dit_are_refused_before_sampling(dit_dir, fake_vae, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(samplers, "sample", lambda *a, **k: pytest.fail("sampled"))
    assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / "g.png"), "--classes", "0", "7") == 1
    assert "[0, 3)" in capsys.readouterr().err
    assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / "s.npz"), "--num-per-class", "1",
                   "--num-classes", "5") == 1  # fmt: skip
    assert "[0, 3)" in capsys.readouterr().err


def test_a_broken_dit_directory_is_reported_not_replaced_by_a_preset(dit_dir, fake_vae, tmp_path, capsys) -> None:
    cfg = json.loads((dit_dir / "config.json").read_text())
    cfg["hidden_size"] = 64  # the weights are 32 wide: a shape error that mentions the config
    (dit_dir / "config.json").write_text(json.dumps(cfg))
    assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / "g.png"), "--classes", "0") == 1
    err = capsys.readouterr().err
    assert "XL/1" not in err and "shape" in err.lower()


# ---- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [["--cfg", "nan"], ["--cfg", "inf"], ["--cfg", "-1"], ["--steps", "0"], ["--shift", "0"],
     ["--batch-size", "0"], ["--cfg-interval", "0.5", "nan"], ["--last-step-size", "1.5"],
     ["--seed", "-3"], ["--classes", "-1"], ["--num-per-class", "0"]],
)  # fmt: skip
def test_numbers_must_be_finite_and_in_range(option, dit_dir, fake_vae, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _sample("--dit", str(dit_dir), "-o", str(tmp_path / "g.png"), *option)
    assert e.value.code == 2
    assert option[0] in capsys.readouterr().err
    assert fake_vae["loads"] == 0 and not (tmp_path / "g.png").exists()


def test_cfg_interval_order_is_checked(dit_dir, fake_vae, tmp_path, capsys) -> None:
    assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / "g.png"), "--classes", "0",
                   "--cfg-interval", "0.8", "0.2") == 1  # fmt: skip
    assert "LO <= HI" in capsys.readouterr().err


def test_nan_images_are_an_error_not_black_pixels() -> None:
    class NaNVAE(FakeVAE):
        def decode(self, latents, normalize=False):
            return torch.full((latents.shape[0], 3, 8, 8), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        sample_images(_dit(), NaNVAE(), [0, 1], **SAMPLER)


# ---- seeds ----------------------------------------------------------------------------------------


def test_grid_sde_noise_is_seeded_on_every_device(dit_dir, fake_vae, tmp_path, monkeypatch) -> None:
    seen = []
    real = samplers.sample

    def spy(*a, **k):
        seen.append(k.get("generator"))
        return real(*a, **k)

    monkeypatch.setattr(samplers, "sample", spy)
    args = ["--dit", str(dit_dir), "--classes", "0", "2", "--method", "euler-maruyama", "--seed", "5"]
    assert _sample(*args, "-o", str(tmp_path / "a.png")) == 0
    assert _sample(*args, "-o", str(tmp_path / "b.png")) == 0
    assert _sample(*args[:-1], "6", "-o", str(tmp_path / "c.png")) == 0
    assert all(isinstance(g, torch.Generator) for g in seen)  # passed whatever the device
    from PIL import Image

    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sample_images_seeds_are_per_image() -> None:
    dit, vae = _dit(), FakeVAE()
    both = sample_images(dit, vae, [0, 1, 2], seed=3, **SAMPLER)
    second = sample_images(dit, vae, [1], seed=3, first_index=1, sde_seed=None, **SAMPLER)
    np.testing.assert_array_equal(both[1:2], second)
    dit.train()
    sample_images(dit, vae, [0], **SAMPLER)
    assert dit.training  # mode restored


# ---- fingerprinted resume -------------------------------------------------------------------------


def test_resume_with_another_model_is_refused(tmp_path) -> None:
    kw = dict(num_per_class=2, num_classes=3, batch_size=2, seed=0, progress=False, **SAMPLER)
    out = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        generate_npz(_dit(0), FakeVAE(fail_after=1), out, **kw)
    assert len(list((tmp_path / "run.npz.shards").glob("shard_*.npz"))) == 1
    with pytest.raises(ValueError, match=r"different run.*dit:"):
        generate_npz(_dit(1), FakeVAE(), out, **kw)  # other weights, same architecture
    with pytest.raises(ValueError, match=r"different run.*cfg_scale"):
        generate_npz(_dit(0), FakeVAE(), out, **{**kw, "cfg_scale": 2.0})
    assert not out.exists()
    done = generate_npz(_dit(0), FakeVAE(), out, **kw)  # the original settings resume
    with np.load(done) as f:
        assert f["arr_0"].shape == (6, 8, 8, 3)


def test_cli_resume_with_another_dit_is_refused(tmp_path, fake_vae, capsys) -> None:
    _dit(0).save_pretrained(tmp_path / "a")
    _dit(1).save_pretrained(tmp_path / "b")
    out = tmp_path / "s.npz"
    fake_vae["vae"] = FakeVAE(fail_after=1)
    args = ["-o", str(out), "--num-per-class", "2", "--batch-size", "2"]
    assert _sample("--dit", str(tmp_path / "a"), *args) == 130  # interrupted after one shard
    fake_vae["vae"] = FakeVAE()
    assert _sample("--dit", str(tmp_path / "b"), *args) == 1
    assert "different run" in capsys.readouterr().err and not out.exists()


def test_foreign_shard_is_named(tmp_path) -> None:
    kw = dict(num_per_class=2, num_classes=3, batch_size=2, seed=0, progress=False, **SAMPLER)
    with pytest.raises(KeyboardInterrupt):
        generate_npz(_dit(0), FakeVAE(fail_after=1), tmp_path / "a.npz", **kw)
    with pytest.raises(KeyboardInterrupt):
        generate_npz(_dit(0), FakeVAE(fail_after=0), tmp_path / "b.npz", **{**kw, "seed": 9})
    foreign = tmp_path / "b.npz.shards" / "shard_000000.npz"
    (tmp_path / "a.npz.shards" / "shard_000000.npz").replace(foreign)  # another run's shard
    with pytest.raises(ValueError, match="foreign shard") as e:
        generate_npz(_dit(0), FakeVAE(), tmp_path / "b.npz", **{**kw, "seed": 9})
    assert str(foreign) in str(e.value)


# ---- outputs and old spellings ------------------------------------------------------------------


def test_existing_outputs_are_refused_before_loading(dit_dir, fake_vae, tmp_path, capsys) -> None:
    (tmp_path / "g.png").write_bytes(b"keep")
    (tmp_path / "s.npz").write_bytes(b"keep")
    assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / "g.png"), "--classes", "0") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / "s.npz"), "--num-per-class", "1") == 1
    assert fake_vae["loads"] == 0 and (tmp_path / "g.png").read_bytes() == b"keep"
    assert _sample("--dit", str(dit_dir), "-o", str(tmp_path / "g.png"), "--classes", "0", "--overwrite") == 0
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
