"""Reconstruction / generation evaluation protocols and ADM npz I/O, with tiny stand-in networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from dmvae.evaluation import compute_npz_stats, evaluate_generation, evaluate_reconstruction
from dmvae.image import center_crop_arr, list_images, resize_center_crop
from dmvae.training.data import ImageFolder, eval_transform
from dmvae.metrics.precision_recall import precision_recall
from dmvae.npz import iter_npz_images, load_npz_images, npz_image_shape, save_npz_images
from dmvae.metrics import StreamingStats, frechet_distance, inception_score, to_uint8

SIZE = 64


class TinyExtractor(nn.Module):
    """Stand-in for Inception: per-image colour means and standard deviations (6-d, so that 8
    images give full-rank covariances like 50k images do in 2048-d) and fixed random logits, all
    in float64 so that features do not depend on the batch they are computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "w", torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.dtype == torch.uint8  # the extractor contract: uint8 (N, 3, H, W)
        x = x.double() / 255
        f = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # (N, 6)
        return {"pool": f, "logits": 20 * f @ self.w}


class IdentityAE(nn.Module):
    def encode(self, x, normalize=True):
        return x.clone()

    def decode(self, z, normalize=True):
        return z.clone()


class BlurAE(nn.Module):
    """encode = 4x average pooling (the 'latents'), decode = bilinear upsampling; records the
    normalize flag it was called with."""

    def __init__(self):
        super().__init__()
        self.calls: list[bool] = []

    def encode(self, x, normalize=True):
        self.calls.append(normalize)
        return F.avg_pool2d(x.double(), 4).float()  # (B, 3, H/4, W/4)

    def decode(self, z, normalize=True):
        return F.interpolate(z.double(), scale_factor=4, mode="bilinear", align_corners=False).float() * 1.02


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """An ImageNet-val-like tree of real photos: val/<wnid>/<name>.{JPEG,png}."""
    root = tmp_path_factory.mktemp("val")
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    k = 0
    for c, img in enumerate(photos):
        d = root / f"n0000000{c}"
        d.mkdir()
        small = Image.fromarray(img).reduce(2)
        small.save(d / f"ILSVRC2012_val_{k:08d}.JPEG", quality=95)
        small.transpose(Image.FLIP_LEFT_RIGHT).save(d / f"ILSVRC2012_val_{k + 1:08d}.png")
        k += 2
    (root / "notes.txt").write_text("not an image")
    return root


def _real_batch(image_dir):
    ds = ImageFolder(image_dir, eval_transform(SIZE), labels="none")
    return torch.stack([ds[i][0] for i in range(len(ds))])  # (8, 3, 64, 64) uint8


# ------------------------------------------------------------------ data


def test_list_images_and_even_subset(image_dir, tmp_path):
    files = list_images(image_dir)
    assert len(files) == 8 and all(f.suffix in (".JPEG", ".png") for f in files)
    sub = list_images(image_dir, num=4)
    assert len({f.parent.name for f in sub}) == 4  # spread over every class folder, not the first 4 files
    with pytest.raises(ValueError, match="only 8"):
        list_images(image_dir, num=9)
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)


def test_center_crops():
    img = Image.fromarray(skdata.chelsea())  # 451 x 300 (W x H)
    out = np.asarray(center_crop_arr(img, SIZE))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    # ADM center_crop_arr, spelled out: BOX-halve while short side >= 2*64 (300 -> 150 -> 75),
    # BICUBIC to short side 64 (long side round(112 * 64 / 75) = 96), crop offset (96 - 64) // 2 = 16
    halved = img.resize((225, 150), Image.BOX).resize((112, 75), Image.BOX)
    expected = np.asarray(halved.resize((96, 64), Image.BICUBIC))[:, 16:80]
    np.testing.assert_array_equal(out, expected)
    # an image already at the target size is untouched
    sq = np.asarray(img)[:SIZE, :SIZE]
    np.testing.assert_array_equal(np.asarray(center_crop_arr(Image.fromarray(sq), SIZE)), sq)
    # the reference's val transform: short side 96 with LANCZOS, torchvision-style centre crop
    ref = resize_center_crop(img, SIZE)
    expected = np.asarray(img.resize((144, 96), Image.LANCZOS))[16:80, 40:104]
    np.testing.assert_array_equal(ref, expected)


# ------------------------------------------------------------------ reconstruction


def test_identity_model_gives_zero_rfid(image_dir):
    res = evaluate_reconstruction(
        IdentityAE(),
        image_dir,
        feature_extractor=TinyExtractor(),
        image_size=SIZE,
        batch_size=3,
        progress=False,
    )
    assert res.num_images == 8
    assert abs(res.rfid) < 1e-9
    assert res.psnr == float("inf") and res.ssim == pytest.approx(1.0)
    assert res.latents is not None and res.latents["latent_channels"] == 3
    assert res.to_dict()["crop"] == "adm"


def test_reconstruction_numbers_match_direct_computation(image_dir):
    model = BlurAE()
    res = evaluate_reconstruction(
        model, image_dir, feature_extractor=TinyExtractor(), image_size=SIZE, batch_size=8, progress=False
    )
    assert set(model.calls) == {False}  # statistics of the raw (not normalised) latents
    real = _real_batch(image_dir)
    x = real.float() / 127.5 - 1
    z = model.encode(x)
    fake = to_uint8(model.decode(z))
    ext = TinyExtractor()
    rfid = frechet_distance(
        *StreamingStats().update(ext(real)["pool"]).compute(),
        *StreamingStats().update(ext(fake)["pool"]).compute(),
    )
    assert res.rfid == pytest.approx(rfid, rel=1e-9) and res.rfid > 0
    r_np, f_np = real.permute(0, 2, 3, 1).numpy(), fake.permute(0, 2, 3, 1).numpy()
    ps = np.mean([sk_psnr(a, b, data_range=255) for a, b in zip(r_np, f_np, strict=True)])
    ss = np.mean(
        [
            sk_ssim(
                a,
                b,
                channel_axis=-1,
                data_range=255,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for a, b in zip(r_np, f_np, strict=True)
        ]
    )
    assert res.psnr == pytest.approx(ps, rel=1e-12)
    assert res.ssim == pytest.approx(ss, abs=1e-10)
    lat = res.latents
    zd = z.double()
    assert lat["latent_mean"] == pytest.approx(zd.mean().item(), rel=1e-9)
    assert lat["latent_std"] == pytest.approx(zd.std().item(), rel=1e-9)
    np.testing.assert_allclose(
        lat["latent_channel_std"], zd.transpose(0, 1).reshape(3, -1).std(dim=1).numpy(), rtol=1e-9
    )


def test_batch_size_does_not_change_results(image_dir):
    results = [
        evaluate_reconstruction(
            BlurAE(),
            image_dir,
            feature_extractor=TinyExtractor(),
            image_size=SIZE,
            batch_size=bs,
            progress=False,
        ).to_dict()
        for bs in (1, 3, 8)
    ]
    for other in results[1:]:
        # equal up to float64 rounding of the summed statistics (FIDs are reported to 2 decimals)
        assert other["rfid"] == pytest.approx(results[0]["rfid"], abs=1e-9)
        for key in ("psnr", "ssim"):
            assert other[key] == pytest.approx(results[0][key], rel=1e-12), key
        np.testing.assert_allclose(
            other["latents"]["latent_channel_mean"], results[0]["latents"]["latent_channel_mean"], rtol=1e-9
        )
        assert other["latents"]["latent_std"] == pytest.approx(results[0]["latents"]["latent_std"], rel=1e-9)


def _ddp_recon_worker(rank: int, world: int, init_file: str, image_dir: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res = evaluate_reconstruction(
        BlurAE(), image_dir, feature_extractor=TinyExtractor(), image_size=SIZE, batch_size=3, progress=False
    )
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res.to_dict(), f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_reconstruction_split_across_ranks_equals_single_process(image_dir, tmp_path):
    import json

    import torch.multiprocessing as mp

    single = evaluate_reconstruction(
        BlurAE(), image_dir, feature_extractor=TinyExtractor(), image_size=SIZE, batch_size=8, progress=False
    ).to_dict()
    out = str(tmp_path / "res")
    mp.spawn(_ddp_recon_worker, args=(2, str(tmp_path / "init"), str(image_dir), out), nprocs=2, join=True)
    for rank in (0, 1):  # every rank returns the full result
        res = json.loads(open(f"{out}.{rank}").read())
        assert res["num_images"] == 8
        assert res["rfid"] == pytest.approx(single["rfid"], abs=1e-9)
        assert res["psnr"] == pytest.approx(single["psnr"], rel=1e-12)
        assert res["ssim"] == pytest.approx(single["ssim"], rel=1e-12)
        assert res["latents"]["latent_std"] == pytest.approx(single["latents"]["latent_std"], rel=1e-9)


def test_subset_lpips_and_plain_callable(image_dir):
    from dmvae.lpips import LPIPS

    with pytest.warns(UserWarning, match="random"):
        lp = LPIPS(pretrained=False)
    res = evaluate_reconstruction(
        lambda x: x * 0.8,
        image_dir,
        feature_extractor=TinyExtractor(),
        lpips=lp,
        image_size=SIZE,
        num_images=4,
        batch_size=4,
        progress=False,
    )
    assert res.num_images == 4 and res.latents is None
    ds = ImageFolder(image_dir, eval_transform(SIZE), labels="none", num=4)
    x = torch.stack([ds[i][0] for i in range(4)]).float() / 127.5 - 1
    assert res.lpips == pytest.approx(lp(x, x * 0.8).double().mean().item(), rel=1e-5)
    assert res.lpips > 0


def test_real_dmvae_tiny(image_dir):
    from dmvae.autoencoder import DMVAE

    torch.manual_seed(0)
    model = DMVAE("dmvae-tiny")
    res = evaluate_reconstruction(
        model,
        image_dir,
        feature_extractor=TinyExtractor(),
        image_size=SIZE,
        num_images=2,
        batch_size=2,
        progress=False,
    )
    assert np.isfinite(res.rfid) and np.isfinite(res.psnr)
    assert res.latents["latent_channels"] == model.config.z_channels


def test_reconstruction_errors(image_dir):
    with pytest.raises(ValueError, match="returned shape"):
        evaluate_reconstruction(
            lambda x: x[..., :32, :32],
            image_dir,
            feature_extractor=TinyExtractor(),
            image_size=SIZE,
            progress=False,
        )
    with pytest.raises(ValueError, match="autocast"):  # never silently ignored
        evaluate_reconstruction(
            lambda x: x,
            image_dir,
            feature_extractor=TinyExtractor(),
            image_size=SIZE,
            autocast=True,
            progress=False,
        )
    with pytest.raises(TypeError, match="'pool'"):
        evaluate_reconstruction(
            lambda x: x, image_dir, feature_extractor=lambda u: {"feat": u}, image_size=SIZE, progress=False
        )


# ------------------------------------------------------------------ ADM npz


def test_npz_written_in_adm_layout(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    path = save_npz_images(tmp_path / "samples.npz", imgs, labels=np.arange(5))
    with np.load(path, allow_pickle=False) as f:  # what ADM's evaluator does: np.load(...)["arr_0"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 16, 24, 3)
        np.testing.assert_array_equal(f["arr_0"], imgs)
        np.testing.assert_array_equal(f["arr_1"], np.arange(5))
    with zipfile_of(path) as z:  # stored uncompressed, like np.savez in ADM's sampler
        assert all(i.compress_type == 0 for i in z.infolist())
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # no temp file left behind
    # a torch batch (N, 3, H, W) in [-1, 1] is rounded and transposed to NHWC
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_array_equal(load_npz_images(save_npz_images(tmp_path / "t.npz", t)), imgs)
    # streaming read
    assert npz_image_shape(path) == (5, 16, 24, 3)
    chunks = list(iter_npz_images(path, batch_size=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), imgs)


def zipfile_of(path):
    import zipfile

    return zipfile.ZipFile(path)


def test_npz_errors(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, H, W, 3\)"):
        save_npz_images(tmp_path / "a.npz", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        save_npz_images(tmp_path / "a.npz", np.zeros((2, 8, 8, 3), np.float32))
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(KeyError, match=r"found keys \['images'\]"):
        load_npz_images(other)
    good = save_npz_images(tmp_path / "g.npz", np.zeros((4, 32, 32, 3), np.uint8))
    data = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_npz_images(cut)


# ------------------------------------------------------------------ generation


def test_precision_recall_matches_torch_fidelity_and_brute_force():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(0)
    real = torch.randn(120, 8, generator=g)
    fake = torch.randn(90, 8, generator=g) * 1.3 + 0.4
    p, r = precision_recall(real, fake, k=3, row_batch_size=32)
    # torch-fidelity's argument order: (generated, real)
    ref_p, ref_r = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    assert 0.2 < p < 0.95 and 0.2 < r < 0.95  # a case where both are informative
    assert (p, r) == (pytest.approx(ref_p), pytest.approx(ref_r))
    # brute force in float64
    rn, fn = real.double().numpy(), fake.double().numpy()
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: E731
    rad_r, rad_f = np.sort(d(rn, rn), 1)[:, 3], np.sort(d(fn, fn), 1)[:, 3]
    assert p == pytest.approx((d(fn, rn) <= rad_r[None]).any(1).mean())
    assert r == pytest.approx((d(rn, fn) <= rad_f[None]).any(1).mean())
    assert precision_recall(real, real) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(real[:3], fake)


def test_generation_evaluation(tmp_path, image_dir):
    ext = TinyExtractor()
    real = _real_batch(image_dir).permute(0, 2, 3, 1).numpy()  # (8, 64, 64, 3)
    rng = np.random.default_rng(0)
    fake = np.clip(real.astype(int) + rng.integers(-40, 41, real.shape), 0, 255).astype(np.uint8)
    # samples in two shards (as a torchrun sampling run writes them) vs one file
    save_npz_images(tmp_path / "s0.npz", fake[:5])
    save_npz_images(tmp_path / "s1.npz", fake[5:])
    save_npz_images(tmp_path / "all.npz", fake)
    # reference batch with images only, and an adm_in256_stats-style file with statistics only
    save_npz_images(tmp_path / "ref_images.npz", real)
    ref_stats = compute_npz_stats(
        tmp_path / "ref_images.npz", feature_extractor=ext, batch_size=3, progress=False
    )
    ref_stats.save(tmp_path / "ref_stats.npz")
    np.savez(tmp_path / "virtual.npz", arr_0=real, mu=ref_stats.mu, sigma=ref_stats.sigma)

    kw = dict(feature_extractor=ext, batch_size=3, progress=False, is_splits=2)
    sharded = evaluate_generation([tmp_path / "s0.npz", tmp_path / "s1.npz"], tmp_path / "virtual.npz", **kw)
    single = evaluate_generation(tmp_path / "all.npz", tmp_path / "virtual.npz", **kw)
    assert sharded.num_samples == 8 and sharded.num_reference_images == 8
    assert sharded.fid == pytest.approx(single.fid, abs=1e-9)  # float64 rounding of the sums only
    for key in ("inception_score", "precision", "recall"):
        assert getattr(sharded, key) == pytest.approx(getattr(single, key), rel=1e-12)

    fake_t = torch.from_numpy(fake).permute(0, 3, 1, 2)
    out = ext(fake_t)
    mu, sigma = StreamingStats().update(out["pool"]).compute()
    assert single.fid == pytest.approx(frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma), abs=1e-9)
    assert single.inception_score == pytest.approx(inception_score(out["logits"], splits=2)[0], rel=1e-12)
    p, r = precision_recall(ext(torch.from_numpy(real).permute(0, 3, 1, 2))["pool"], out["pool"])
    assert (single.precision, single.recall) == (p, r)

    stats_only = evaluate_generation(tmp_path / "all.npz", tmp_path / "ref_stats.npz", **kw)
    assert stats_only.fid == pytest.approx(single.fid, abs=1e-12)
    assert stats_only.precision is None and stats_only.reference_stats_from == "file"
    images_only = evaluate_generation(tmp_path / "all.npz", tmp_path / "ref_images.npz", **kw)
    assert images_only.fid == pytest.approx(single.fid, abs=1e-9)
    assert images_only.reference_stats_from == "images"

    same = evaluate_generation(tmp_path / "ref_images.npz", tmp_path / "ref_images.npz", **kw)
    assert abs(same.fid) < 1e-9 and same.precision == 1.0 and same.recall == 1.0

    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    with pytest.raises(KeyError, match=r"found keys \['foo'\]"):
        evaluate_generation(tmp_path / "all.npz", tmp_path / "junk.npz", **kw)


def test_reference_statistics_are_read_and_validated_by_load_reference_stats(tmp_path):
    """A (1, 16) mu used to be reported as "1-d" by evaluate_generation's own reader."""
    from dmvae.evaluation import evaluate_generation

    save_npz_images(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros((1, 16)), sigma=np.eye(16))
    with pytest.raises(ValueError, match=r"mu of shape \(D,\).*\(1, 16\)"):
        evaluate_generation(tmp_path / "s.npz", tmp_path / "ref.npz", feature_extractor=lambda x: x.float().flatten(1),
                            progress=False)


def test_nchw_samples_are_refused_before_any_work(tmp_path):
    from dmvae.evaluation import evaluate_generation

    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(16), sigma=np.eye(16))
    calls = []
    with pytest.raises(ValueError, match="NCHW"):
        evaluate_generation(tmp_path / "nchw.npz", tmp_path / "ref.npz",
                            feature_extractor=lambda x: calls.append(1) or x.float().flatten(1), progress=False)
    assert calls == []


def test_eval_transform_crops_of_the_one_folder_dataset(image_dir):
    from PIL import Image

    img = Image.open(list_images(image_dir)[0]).convert("RGB")
    adm, ref = eval_transform(SIZE)(img), eval_transform(SIZE, "dmvae")(img)
    assert adm.dtype == ref.dtype == torch.uint8 and adm.shape == ref.shape == (3, SIZE, SIZE)
    assert np.array_equal(adm.permute(1, 2, 0).numpy(), np.asarray(center_crop_arr(img, SIZE)))
    assert np.array_equal(ref.permute(1, 2, 0).numpy(), resize_center_crop(img, SIZE))
    with pytest.raises(ValueError, match="crop must be 'adm' or 'dmvae'"):
        eval_transform(SIZE, "square")
    ds = ImageFolder(image_dir, eval_transform(SIZE), labels="none", num=4)
    assert len(ds) == 4 and ds.num_classes == 1 and ds[3][1] == 0
