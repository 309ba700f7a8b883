"""Class-balanced generation to ADM-format npz: layout, determinism, resumption, rank split, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.generate import balanced_labels, generate_npz
from dmvae.image import to_uint8_numpy as to_uint8

SAMPLER = dict(num_steps=3, method="euler")


class FakeVAE(torch.nn.Module):
    """decode(latents, normalize=True): a fixed linear map of the latent to a 3x8x8 image."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls, self.fail_after, self.normalize_flags = 0, fail_after, []

    def decode(self, latents: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.normalize_flags.append(normalize)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        img = latents[:, :3].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        return torch.tanh(img)


@pytest.fixture
def dit() -> LatentDiT:
    torch.manual_seed(0)
    model = LatentDiT(LatentDiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=32,
                                      depth=1, num_heads=2, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_balanced_labels():
    labels = balanced_labels(4, 3)
    assert labels.tolist() == [0, 1, 2, 3] * 3
    assert torch.bincount(labels).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError):
        balanced_labels(0, 3)


def test_to_uint8_matches_reference_conversion():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]


def test_generate_layout_and_determinism(tmp_path, dit):
    vae = FakeVAE()
    out = generate_npz(dit, vae, tmp_path / "a.npz", num_per_class=3, num_classes=3, batch_size=4,
                       seed=7, progress=False, **SAMPLER)
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (9, 8, 8, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3, 3, 3]
    assert all(vae.normalize_flags)
    assert not (tmp_path / "a.npz.shards").exists()  # cleaned after the merge
    assert len({images[i].tobytes() for i in range(9)}) == 9  # no duplicated images
    again = generate_npz(dit, FakeVAE(), tmp_path / "b.npz", num_per_class=3, num_classes=3,
                         batch_size=2, seed=7, progress=False, **SAMPLER)
    with np.load(again) as f:  # per-image seeds: batch size does not change the images
        np.testing.assert_array_equal(f["arr_0"], images)
    other = generate_npz(dit, FakeVAE(), tmp_path / "c.npz", num_per_class=3, num_classes=3,
                         batch_size=4, seed=8, progress=False, **SAMPLER)
    with np.load(other) as f:
        assert not np.array_equal(f["arr_0"], images)


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, dit):
    kw = dict(num_per_class=4, num_classes=3, batch_size=2, seed=3, progress=False, **SAMPLER)
    ref = generate_npz(dit, FakeVAE(), tmp_path / "ref.npz", **kw)
    out = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        generate_npz(dit, FakeVAE(fail_after=2), out, **kw)
    shards = sorted((tmp_path / "run.npz.shards").glob("shard_*.npz"))
    assert len(shards) == 2 and not out.exists()
    resumed = FakeVAE()
    generate_npz(dit, resumed, out, **kw)
    assert resumed.calls == 4  # 6 batches, 2 already done
    with np.load(out) as a, np.load(ref) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    # resuming with different settings is refused
    with pytest.raises(KeyboardInterrupt):
        generate_npz(dit, FakeVAE(fail_after=0), tmp_path / "x.npz", **kw)
    with pytest.raises(ValueError, match="different run"):
        generate_npz(dit, FakeVAE(), tmp_path / "x.npz", **{**kw, "seed": 4})


def test_rank_split(tmp_path, dit):
    kw = dict(num_per_class=3, num_classes=3, batch_size=2, seed=1, progress=False, **SAMPLER)
    ref = generate_npz(dit, FakeVAE(), tmp_path / "ref.npz", **kw)
    out = tmp_path / "dist.npz"
    v1 = FakeVAE()
    assert generate_npz(dit, v1, out, rank=1, world_size=2, **kw) is None
    assert v1.calls == 2  # batches 1, 3 of 0..4
    v0 = FakeVAE()
    assert generate_npz(dit, v0, out, rank=0, world_size=2, **kw) == out
    assert v0.calls == 3
    with np.load(out) as a, np.load(ref) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_rank0_reports_missing_shards(tmp_path, dit):
    with pytest.raises(RuntimeError, match="missing"):
        generate_npz(dit, FakeVAE(), tmp_path / "m.npz", num_per_class=2, num_classes=3,
                     batch_size=2, rank=0, world_size=2, progress=False, **SAMPLER)


def test_bad_arguments(tmp_path, dit):
    with pytest.raises(ValueError, match="num_steps"):
        generate_npz(dit, FakeVAE(), tmp_path / "a.npz", num_per_class=1, progress=False)
    with pytest.raises(ValueError, match="rank"):
        generate_npz(dit, FakeVAE(), tmp_path / "a.npz", num_per_class=1, rank=2, world_size=2,
                     progress=False, **SAMPLER)
    with pytest.raises(ValueError, match="noise"):
        generate_npz(dit, FakeVAE(), tmp_path / "a.npz", num_per_class=1, noise=1, progress=False,
                     **SAMPLER)


# ---- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def cli_models(tmp_path, dit, monkeypatch):
    from dmvae import autoencoder
    dit.save_pretrained(tmp_path / "dit")
    monkeypatch.setattr(autoencoder.DMVAE, "from_pretrained", classmethod(lambda cls, *a, **k: FakeVAE()))
    return tmp_path / "dit"


def test_cli_sample_grid(tmp_path, cli_models, capsys):
    from PIL import Image

    from dmvae.cli import main

    out = tmp_path / "grid.png"
    rc = main(["sample", "--dit", str(cli_models), "--model", "unused", "--classes", "0", "2", "1",
               "--cfg", "2.0", "--steps", "2", "--seed", "1", "-o", str(out), "--device", "cpu",
               "--json"])
    assert rc == 0
    summary = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["classes"] == [0, 2, 1] and summary["cfg_scale"] == 2.0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # 3 tiles of 8x8 in a 2x2 grid, 2-px borders


def test_cli_sample_npz(tmp_path, cli_models):
    from dmvae.cli import main

    out = tmp_path / "s.npz"
    rc = main(["sample", "--dit", str(cli_models), "--model", "unused", "--num-per-class", "2",
               "-o", str(out), "--steps", "2", "--method", "heun", "--batch-size", "4",
               "--device", "cpu"])
    assert rc == 0
    with np.load(out) as f:
        assert f["arr_0"].shape == (6, 8, 8, 3) and np.bincount(f["arr_1"]).tolist() == [2, 2, 2]
    assert main(["sample", "--dit", str(cli_models), "--model", "x", "--steps", "2"]) == 1
