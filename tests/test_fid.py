"""Fréchet distance, Inception Score, streaming statistics, reference files, Inception-v3 loading."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch
from scipy import linalg

from dmvae.files import CheckpointError
from dmvae.metrics import (
    InceptionV3Features,
    InceptionWeightsError,
    StreamingStats,
    find_inception_weights,
    frechet_distance,
    inception_score,
    load_reference_stats,
    save_reference_stats,
)


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / ADM formulation with scipy.linalg.sqrtm."""
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_stats(rng, dim, n, shift=0.0, mix=None):
    x = rng.normal(size=(n, dim))
    if mix is not None:
        x = x @ mix
    x = x + shift
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim", [8, 64, 128])
def test_frechet_distance_equals_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    mu1, s1 = _random_stats(rng, dim, 4 * dim)
    mu2, s2 = _random_stats(rng, dim, 4 * dim, shift=0.3, mix=rng.normal(size=(dim, dim)) * 0.5)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), abs=1e-6, rel=1e-9)
    # torch inputs of any float dtype are accepted and computed in float64
    t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == ours
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)  # symmetric


def test_frechet_distance_identical_and_rank_deficient():
    rng = np.random.default_rng(0)
    mu, s = _random_stats(rng, 32, 200)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    # fewer samples than dimensions: singular covariances, still finite and real
    mu1, s1 = _random_stats(rng, 64, 20)
    mu2, s2 = _random_stats(rng, 64, 20, shift=0.1)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d > 0
    assert d == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-4)
    # identical singular statistics of large, positive features (Inception-like, 10 samples in
    # 512-d): rounding noise in the null space must not add up to a visible FID (it gives -0.07
    # when eigenvalues are only clamped at zero)
    x = np.abs(rng.normal(size=(10, 512))) * 30
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6


def test_frechet_distance_errors():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match=r"sigma2 must be \(4, 4\)"):
        frechet_distance(mu, s, mu, np.eye(3))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(mu, s, np.zeros(3), s)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, s * np.nan, mu, s)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(250, 30, generator=torch.Generator().manual_seed(0)) * 3
    ref = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-12)
    # uniform predictions give IS = 1; one-hot predictions over K classes equally used give IS = K
    assert inception_score(torch.zeros(40, 5), splits=2)[0] == pytest.approx(1.0)
    onehot = torch.eye(8).repeat(5, 1) * 50
    assert inception_score(onehot, splits=1, shuffle_seed=None)[0] == pytest.approx(8.0, rel=1e-6)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:5], splits=10)


def test_streaming_stats_equal_all_at_once():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(1000, 48)).astype(np.float32) * 2 + 5
    mu_ref, sigma_ref = feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False)
    results = []
    for bs in (1000, 37, 256):
        st = StreamingStats()
        for i in range(0, len(feats), bs):
            st.update(torch.from_numpy(feats[i : i + bs]))
        assert st.n == 1000
        results.append(st.compute())
    for mu, sigma in results:
        assert mu.dtype == np.float64 and sigma.shape == (48, 48)
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    # merge (what all_reduce does across ranks) equals one accumulator over everything
    a, b = StreamingStats().update(feats[:300]), StreamingStats().update(feats[300:])
    merged = a.merge(b).compute()
    np.testing.assert_allclose(merged.sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    # state_dict round trip resumes accumulation exactly
    part = StreamingStats().update(feats[:500])
    resumed = StreamingStats().load_state_dict(part.state_dict()).update(feats[500:])
    np.testing.assert_allclose(resumed.compute().mu, mu_ref, rtol=1e-12)


def test_streaming_stats_errors():
    st = StreamingStats()
    with pytest.raises(ValueError, match="at least 2"):
        st.compute()
    st.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dimension 5"):
        st.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        st.update(np.zeros(4))


def _ddp_worker(rank: int, world: int, init_file: str, feats: np.ndarray, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    st = StreamingStats().update(feats[rank::world])  # each rank sees a strided shard
    st.all_reduce()
    if rank == 0:
        mu, sigma = st.compute()
        np.savez(out, mu=mu, sigma=sigma, n=st.n)
    dist.destroy_process_group()


@pytest.mark.slow
def test_streaming_stats_all_reduce_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    feats = np.random.default_rng(2).normal(size=(101, 16))
    out = str(tmp_path / "out.npz")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), feats, out), nprocs=2, join=True)
    res = np.load(out)
    assert int(res["n"]) == 101
    np.testing.assert_allclose(res["mu"], feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(res["sigma"], np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-13)


def test_reference_stats_layouts(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = _random_stats(rng, 16, 64)
    # ADM evaluator reference batch: images + mu/sigma + spatial statistics
    virtual = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(
        virtual,
        arr_0=np.zeros((4, 8, 8, 3), np.uint8),
        mu=mu,
        sigma=sigma,
        mu_s=mu[:4],
        sigma_s=sigma[:4, :4],
    )
    # MAR / DMVAE adm_in256_stats.npz: mu/sigma only (float32 on purpose: returned as float64)
    adm = tmp_path / "adm_in256_stats.npz"
    np.savez(adm, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    for path in (virtual, adm):
        st = load_reference_stats(path)
        assert st.mu.dtype == np.float64 and st.sigma.shape == (16, 16)
        np.testing.assert_allclose(st.mu, mu, rtol=1e-6)
    # our writer produces the adm_in256_stats layout, atomically
    out = save_reference_stats(tmp_path / "mine.npz", mu, sigma)
    with np.load(out) as f:
        assert sorted(f.files) == ["mu", "sigma"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_reference_stats_errors(tmp_path):
    images_only = tmp_path / "images.npz"
    np.savez(images_only, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(KeyError, match=r"found keys \['arr_0'\]"):
        load_reference_stats(images_only)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3), sigma=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="sigma of shape"):
        load_reference_stats(bad)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "images.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable"):
        load_reference_stats(truncated)
    with pytest.raises(FileNotFoundError):
        load_reference_stats(tmp_path / "missing.npz")


# ------------------------------------------------------------------ Inception-v3


@pytest.fixture(scope="module")
def random_inception():
    return InceptionV3Features(pretrained=False)


@pytest.fixture(scope="module")
def inception_file(random_inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception.net.state_dict(), path)
    return path


def test_inception_architecture_and_outputs(random_inception):
    net = random_inception
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 23_850_960  # Inception-v3 with the 1008-way TF classifier, no aux head
    images = torch.randint(
        0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = net(images)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["pool"].dtype == torch.float32
    # floats in [-1, 1] are rounded to uint8 first: same features as the rounded image
    floats = images.float() / 127.5 - 1 + 0.001
    assert torch.equal(net(floats)["pool"], out["pool"])
    net.train()  # a metric network never leaves eval mode
    assert not net.net.training
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(images[:, :1])


def test_inception_loads_file_strictly(random_inception, inception_file, tmp_path, monkeypatch):
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    ref = random_inception(x)["pool"]
    loaded = InceptionV3Features(inception_file)
    assert loaded.weights_source == str(inception_file)
    assert torch.equal(loaded(x)["pool"], ref)
    # environment variable
    monkeypatch.setenv("DMVAE_INCEPTION_WEIGHTS", str(inception_file))
    assert find_inception_weights() == inception_file
    # torch hub cache (where torch-fidelity / pytorch-fid keep their downloads)
    monkeypatch.delenv("DMVAE_INCEPTION_WEIGHTS")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    os.symlink(inception_file, cached)
    assert find_inception_weights() == cached
    # safetensors works too
    from safetensors.torch import save_file

    st_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in random_inception.net.state_dict().items()}, st_path)
    assert torch.equal(InceptionV3Features(st_path)(x)["pool"], ref)


def test_inception_missing_and_bad_weights(random_inception, tmp_path, monkeypatch):
    monkeypatch.delenv("DMVAE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(InceptionWeightsError, match="DMVAE_INCEPTION_WEIGHTS") as e:
        InceptionV3Features()
    assert "never downloads" in str(e.value) and str(tmp_path / "empty") in str(e.value)
    with pytest.raises(InceptionWeightsError, match="nope.pth"):
        InceptionV3Features(tmp_path / "nope.pth")
    # wrong keys / shapes: CheckpointError naming them
    sd = dict(random_inception.net.state_dict())
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["Conv2d_1a_3x3.conv.weight"] = torch.zeros(1, 2, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError) as e:
        InceptionV3Features(bad)
    msg = str(e.value)
    assert "fc.bias" in msg and "extra.weight" in msg and "Conv2d_1a_3x3.conv.weight" in msg
    # a pickle holding more than tensors is refused (weights_only=True), never executed
    evil = tmp_path / "evil.pth"
    torch.save({"fc.bias": zipfile.ZipInfo("x")}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        InceptionV3Features(evil)
    with pytest.raises(ValueError, match="not both"):
        InceptionV3Features(bad, pretrained=False)


def test_same_network_and_features_as_torch_fidelity(inception_file):
    """Our wrapper is torch-fidelity's `inception-v3-compat` extractor, bit for bit, given the same
    weights (torch-fidelity itself reads the file with weights_only=False; trusted test file here)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(inception_file)
    )
    x = torch.randint(0, 256, (2, 3, 37, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pool, logits = theirs(x)
    ours = InceptionV3Features(inception_file)(x)
    assert torch.equal(ours["pool"], pool) and torch.equal(ours["logits"], logits)


def test_frechet_distance_of_identical_statistics_is_never_negative() -> None:
    """Rounding made identical statistics print as -1e-28 / -3.6e-15; the distance is >= 0."""
    for seed in range(5):
        feats = np.random.default_rng(seed).normal(size=(50, 16))
        mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
        d = frechet_distance(mu, sigma, mu, sigma)
        assert d == 0.0 or 0.0 < d < 1e-9
    assert frechet_distance(np.zeros(16), np.eye(16), np.zeros(16), np.eye(16)) == 0.0
