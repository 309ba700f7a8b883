"""PSNR / SSIM must equal scikit-image's on real photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from dmvae.metrics import psnr, ssim, to_uint8, uint8_to_float


def _photos() -> list[np.ndarray]:
    # (H, W, 3) uint8 crops of real photos, different sizes (non-square on purpose)
    return [
        skdata.astronaut()[:200, 100:360],
        skdata.coffee()[100:260, 200:392],
        skdata.chelsea()[:150, :170],
    ]


def _distort(img: np.ndarray, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        out = img.astype(np.int64) + rng.integers(-25, 26, img.shape)
    elif kind == "blur":
        out = np.round(gaussian(img, sigma=2.0, channel_axis=-1, preserve_range=True))
    else:  # shift of one colour channel, a typical autoencoder colour cast
        out = img.astype(np.int64)
        out[..., 1] += 12
    return np.clip(out, 0, 255).astype(np.uint8)


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


SK_SSIM = dict(channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


@pytest.mark.parametrize("kind", ["noise", "blur", "cast"])
def test_uint8_matches_skimage(kind):
    for i, img in enumerate(_photos()):
        other = _distort(img, kind, i)
        ours_p = psnr(_chw(img), _chw(other)).item()
        ours_s = ssim(_chw(img), _chw(other)).item()
        assert ours_p == pytest.approx(sk_psnr(img, other, data_range=255), rel=1e-12, abs=1e-12)
        assert ours_s == pytest.approx(sk_ssim(img, other, data_range=255, **SK_SSIM), abs=1e-10)


def test_float_minus1_1_matches_skimage_on_0_1():
    img = _photos()[0]
    other = _distort(img, "blur", 0)
    a, b = img / 255.0, other / 255.0  # what skimage users pass: floats in [0, 1]
    ta, tb = _chw(a * 2 - 1).float(), _chw(b * 2 - 1).float()  # dmvae's convention: [-1, 1]
    assert psnr(ta, tb).item() == pytest.approx(sk_psnr(a, b, data_range=1), rel=1e-6)
    assert ssim(ta, tb).item() == pytest.approx(sk_ssim(a, b, data_range=1, **SK_SSIM), abs=1e-6)
    # and the same numbers as the uint8 pair (SSIM is not offset-invariant, so this pins the mapping)
    assert ssim(ta, tb).item() == pytest.approx(ssim(_chw(img), _chw(other)).item(), abs=1e-6)
    assert psnr(ta, tb).item() == pytest.approx(psnr(_chw(img), _chw(other)).item(), rel=1e-6)


def test_batched_equals_per_image():
    imgs = [_photos()[0][:128, :128], _photos()[1][:128, :128], _photos()[2][:128, :128]]
    x = torch.stack([_chw(i) for i in imgs])
    y = torch.stack([_chw(_distort(i, "noise", k)) for k, i in enumerate(imgs)])
    p, s = psnr(x, y), ssim(x, y)
    assert p.shape == s.shape == (3,) and p.dtype == torch.float64
    for k in range(3):
        assert p[k].item() == pytest.approx(psnr(x[k], y[k]).item(), rel=1e-14)
        assert s[k].item() == pytest.approx(ssim(x[k], y[k]).item(), rel=1e-14)


def test_identical_and_clamp():
    x = _chw(_photos()[2])
    assert psnr(x, x).item() == float("inf")
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    f = uint8_to_float(x)
    over = f * 1.5  # decoder outputs beyond [-1, 1]
    # clamped by default: same as comparing with the saturated image
    assert psnr(f, over).item() == pytest.approx(psnr(f, over.clamp(-1, 1), clamp=False).item())
    assert psnr(f, over, clamp=False).item() < psnr(f, over).item()


def test_to_uint8_is_the_reference_quantisation():
    x = torch.linspace(-1.2, 1.2, 10001)
    u = to_uint8(x)
    # round half-up of 127.5 (x + 1), saturating outside [-1, 1]
    expected = np.clip(np.floor(127.5 * x.numpy().astype(np.float32) + np.float32(128)), 0, 255).astype(
        np.uint8
    )
    np.testing.assert_array_equal(u.numpy(), expected)
    assert (to_uint8(uint8_to_float(torch.arange(256, dtype=torch.uint8))) == torch.arange(256)).all()
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([float("nan")]))


def test_clear_errors():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, torch.zeros(1, 3, 32, 31, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        ssim(x, x.float())
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        psnr(x[0, 0], x[0, 0])
