"""LPIPS-VGG: parity with the `lpips` package, metric properties, weight loading and its errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dmvae.lpips import LPIPS, LPIPSWeightsError, convert_lpips_state_dict


def _photos(size: int = 32) -> torch.Tensor:
    from skimage import data

    imgs = [data.astronaut(), data.chelsea()[:, :451], data.coffee()]
    out = []
    for im in imgs:
        t = torch.from_numpy(im).permute(2, 0, 1).float()[None] / 127.5 - 1  # (1, 3, H, W) in [-1, 1]
        s = min(t.shape[-2:])
        t = t[..., :s, :s]
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out)  # (3, 3, size, size)


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    with pytest.warns(UserWarning, match="meaningless"):
        return LPIPS(pretrained=False)


def test_parity_with_lpips_package() -> None:
    lpips = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # trained heads from the wheel
    ours = LPIPS(weights=ref.state_dict())
    x = _photos()
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    d_ref = ref(x, y).flatten()
    d_ours = ours(x, y)
    assert d_ours.shape == (3,)
    assert (d_ours - d_ref).abs().max().item() < 1e-6
    assert (d_ours > 0).all()


def test_torchvision_trunk_file_plus_wheel_heads(tmp_path, random_lpips) -> None:
    """A torchvision-layout trunk file (features.{i}.*, classifier.* ignored) + heads from the lpips wheel."""
    pytest.importorskip("lpips")
    trunk = {}
    for k, v in random_lpips.state_dict().items():
        if k.startswith("net."):
            _, _, idx, kind = k.split(".")
            trunk[f"features.{idx}.{kind}"] = v.clone()
    trunk["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "vgg16.pth"
    torch.save(trunk, path)
    m = LPIPS(weights=path)
    for k, v in trunk.items():
        if k.startswith("features."):
            assert torch.equal(m.state_dict()[convert_lpips_state_dict({k: v}).popitem()[0]], v)
    # heads came from the wheel: trained heads are non-negative and not the random ones
    assert not torch.equal(m.lin0.model[1].weight, random_lpips.lin0.model[1].weight)


def test_safetensors_round_trip(tmp_path, random_lpips) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "lpips_vgg.safetensors"
    save_file(random_lpips.state_dict(), str(path))
    m = LPIPS(weights=str(path))
    x = _photos(32)
    assert torch.equal(m(x, x.flip(0)), random_lpips(x, x.flip(0)))


def test_metric_properties(random_lpips) -> None:
    x = _photos()
    y = x.flip(0)
    d = random_lpips(x, y)
    assert d.shape == (3,)
    assert torch.all(random_lpips(x, x) == 0)
    assert torch.allclose(d, random_lpips(y, x), rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    dists = [random_lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.03, 0.2, 0.8)]
    assert all(a < b for a, b in zip(dists, dists[1:])), dists
    # [0, 1] inputs with normalize=True give the same distance
    d01 = random_lpips((x + 1) / 2, (y + 1) / 2, normalize=True)
    assert torch.allclose(d01, d, rtol=1e-5, atol=1e-6)
    dist, terms = random_lpips(x, y, per_layer=True)
    assert len(terms) == 5 and torch.allclose(torch.stack(terms).sum(0), dist)


def test_gradients_reach_input_not_weights(random_lpips) -> None:
    x = _photos(32)
    y = x.flip(0).clone().requires_grad_(True)
    random_lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training  # frozen metric: a parent's .train() does not switch it


def test_missing_trunk_error(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DMVAE_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    with pytest.raises(LPIPSWeightsError, match="VGG16 trunk") as e:
        LPIPS()
    assert "vgg16-397923af.pth" in str(e.value) and "pretrained=False" in str(e.value)


def test_missing_heads_error(tmp_path, monkeypatch, random_lpips) -> None:
    import dmvae.lpips as mod

    monkeypatch.setattr(mod, "_lpips_wheel_heads_file", lambda: None)
    trunk = {k: v for k, v in random_lpips.state_dict().items() if k.startswith("net.")}
    with pytest.raises(LPIPSWeightsError, match="linear heads"):
        LPIPS(weights=trunk)


def test_env_var_and_bad_files(tmp_path, monkeypatch, random_lpips) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "w.safetensors"
    save_file(random_lpips.state_dict(), str(good))
    monkeypatch.setenv("DMVAE_LPIPS_WEIGHTS", str(good))
    assert torch.equal(LPIPS().lin2.model[1].weight, random_lpips.lin2.model[1].weight)

    bad_shape = dict(random_lpips.state_dict())
    bad_shape["lin0.model.1.weight"] = torch.zeros(1, 3, 1, 1)
    with pytest.raises(LPIPSWeightsError, match="wrong shapes"):
        LPIPS(weights=bad_shape)
    extra = dict(random_lpips.state_dict(), **{"foo.weight": torch.zeros(1)})
    with pytest.raises(LPIPSWeightsError, match="unexpected keys"):
        LPIPS(weights=extra)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(LPIPSWeightsError, match="could not read"):
        LPIPS(weights=corrupt)
    with pytest.raises(LPIPSWeightsError, match="not found"):
        LPIPS(weights=tmp_path / "nope.pth")


def test_hf_source_offline_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(LPIPSWeightsError, match="Hugging Face"):
        LPIPS(weights="hf://someone/lpips-vgg/lpips_vgg.safetensors")


def test_input_errors(random_lpips) -> None:
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="same shape"):
        random_lpips(x, torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match="RGB"):
        random_lpips(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=">= 16"):
        random_lpips(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="vgg"):
        LPIPS(net="alex", pretrained=False)
