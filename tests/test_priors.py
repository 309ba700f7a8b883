"""Reference priors: registry, closed-form velocities (Monte-Carlo checked), samplers, banks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmvae.priors import (
    DiffusionNoisePrior,
    FeaturePrior,
    GaussianMixturePrior,
    GaussianPrior,
    LearnedPrior,
    ReferencePrior,
    SamplesPrior,
    SShape2D,
    create_prior,
    fit_reference_model,
    list_priors,
    register_prior,
    sshape_numpy,
)
from dmvae.priors import base as prior_base


# ---------------------------------------------------------------- Monte-Carlo velocity check
def _mc_velocity(prior: ReferencePrior, t: float, queries: torch.Tensor, n: int = 200_000, labels=None) -> torch.Tensor:
    """Monte-Carlo E[x - eps | x_t = q] from prior samples alone (self-normalised importance
    sampling): given x, x_t = q means eps = (q - t x) / (1 - t), with likelihood
    N(q; t x, (1 - t)^2 I). Independent of the closed-form formula under test."""
    g = torch.Generator().manual_seed(1)
    x = prior.sample(n, generator=g, labels=labels).double().flatten(1)  # (n, D)
    out = []
    for q in queries.double().flatten(1):
        logw = -((q - t * x) ** 2).sum(1) / (2 * (1 - t) ** 2)
        w = torch.softmax(logw, 0)[:, None]
        assert 1.0 / (w**2).sum() > 1000, "too few effective Monte-Carlo samples"
        eps = (q - t * x) / (1 - t)
        out.append(((x - eps) * w).sum(0))
    return torch.stack(out).float().reshape(queries.shape)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_gaussian_velocity_matches_monte_carlo(t):
    prior = GaussianPrior((2,), mean=torch.tensor([0.5, -1.0]), std=torch.tensor([0.7, 1.3]))
    q = torch.tensor([[0.0, 0.0], [0.4, -0.6], [-0.3, 0.2]])
    v = prior.velocity(q, torch.full((3,), t))
    mc = _mc_velocity(prior, t, q)
    assert (v - mc).abs().max() < 0.02
    # and it is NOT the velocity of another Gaussian (the check can fail)
    other = GaussianPrior((2,), mean=0.0, std=1.0).velocity(q, torch.full((3,), t))
    assert (other - mc).abs().max() > 0.2


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_gmm_velocity_matches_monte_carlo(t):
    prior = GaussianMixturePrior((2,), means=torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]]),
                                 stds=torch.tensor([0.3, 0.5, 0.2]), weights=torch.tensor([0.5, 0.3, 0.2]))
    q = torch.tensor([[-0.5, 0.0], [0.5, 0.3], [0.0, -0.5], [0.1, 0.1]]) * t
    v = prior.velocity(q, torch.full((4,), t))
    mc = _mc_velocity(prior, t, q)
    assert (v - mc).abs().max() < 0.03


def test_gmm_class_conditional_component_and_null():
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    prior = GaussianMixturePrior((2,), means=means, stds=0.3, class_conditional=True)
    assert prior.num_classes == 2
    x = prior.sample(2000, labels=torch.ones(2000, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert (x[:, 0] > 0).float().mean() > 0.99
    q, t = torch.tensor([[0.3, 0.1]]), torch.tensor([0.6])
    v1 = prior.velocity(q, t, torch.tensor([1]))
    single = GaussianPrior((2,), mean=means[1], std=0.3).velocity(q, t)
    assert torch.allclose(v1, single, atol=1e-5)
    v_null = prior.velocity(q, t, torch.tensor([2]))
    assert torch.allclose(v_null, prior.velocity(q, t), atol=1e-6)
    with pytest.raises(ValueError, match="labels must lie"):
        prior.velocity(q, t, torch.tensor([3]))


def test_gaussian_velocity_endpoints_and_predict_x():
    prior = GaussianPrior((3, 2, 2), mean=0.2, std=0.5)
    x = torch.randn(4, 3, 2, 2)
    v0 = prior.velocity(x, torch.zeros(4))  # t = 0: x_t = eps, E[x] = mean -> v = mean - x_t
    assert torch.allclose(v0, 0.2 - x, atol=1e-6)
    t = torch.full((4,), 0.999999)
    assert torch.allclose(prior.predict_x(x, t), x, atol=1e-3)  # near data, x_hat = x_t
    t = torch.rand(4)
    s = prior.score(x, t)  # score of N(t mu, t^2 s^2 + (1-t)^2) in closed form
    var = (t**2 * 0.25 + (1 - t) ** 2).reshape(4, 1, 1, 1)
    assert torch.allclose(s, -(x - t.reshape(4, 1, 1, 1) * 0.2) / var, atol=1e-4)


def test_gmm_equals_samples_prior_with_bandwidth():
    bank = torch.randn(7, 2, 3)
    a = SamplesPrior(bank, bandwidth=0.4, chunk_size=3)  # streamed over 3 chunks
    b = GaussianMixturePrior((2, 3), means=bank, stds=0.4)
    x, t = torch.randn(5, 2, 3), torch.rand(5)
    assert torch.allclose(a.velocity(x, t), b.velocity(x, t), atol=1e-5)


def test_samples_prior_delta_bank_and_labels(tmp_path):
    bank = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    path = tmp_path / "bank.safetensors"
    save_file({"samples": bank, "y": labels}, str(path))
    p = SamplesPrior(path, labels_key="y")
    assert p.num_classes == 2 and len(p) == 3
    # near t = 1 the posterior picks the closest bank row
    x_hat = p.predict_x(torch.tensor([[0.9, 0.1]]), torch.tensor([0.95]))
    assert torch.allclose(x_hat, bank[:1], atol=1e-4)
    # class 1 excludes row 0
    x_hat1 = p.predict_x(torch.tensor([[0.9, 0.1]]), torch.tensor([0.95]), torch.tensor([1]))
    assert x_hat1[0, 0] < 0.5
    s = p.sample(300, labels=torch.full((300,), 1), generator=torch.Generator().manual_seed(0))
    assert not (s == bank[0]).all(1).any()
    with pytest.raises(KeyError, match="no tensor"):
        SamplesPrior(path, key="nope")
    with pytest.raises(ValueError, match="NaN"):
        SamplesPrior(torch.tensor([[float("nan"), 0.0]]))


def test_samples_prior_bounded_memory_matches_one_chunk():
    bank = torch.randn(1000, 16)
    x, t = torch.randn(8, 16), torch.rand(8)
    full = SamplesPrior(bank, chunk_size=10_000).velocity(x, t)
    chunked = SamplesPrior(bank, chunk_size=64).velocity(x, t)
    assert torch.allclose(full, chunked, atol=1e-5)


def test_sshape_matches_reference_fixture_bitwise(fixtures_dir):
    d = load_file(fixtures_dir / "toy2d" / "toy2d.safetensors")
    prior = SShape2D(seed=42)
    s = prior.sample_numpy(4096)
    # The random draws are bitwise the reference's (same PCG64 stream, same order) ...
    rng = np.random.default_rng(42)
    assert np.array_equal(rng.uniform(-1, 1, 4096), d["rng_uniform_t"].numpy())
    assert np.array_equal(rng.normal(0.0, 0.06, 4096), d["rng_normal_radial"].numpy())
    # ... and so are the samples up to the last bit of numpy's float64 sin/cos/arctan2, which
    # depends on the CPU's SIMD path (the fixture machine's differs from an AVX2-only one by one
    # ulp in ~1.5 % of the values): 1e-15 is ~5 ulp at |x| <= 1.
    np.testing.assert_allclose(s, d["samples"].numpy(), rtol=0, atol=1e-15)
    torch_s = SShape2D(seed=42).sample(4096)
    assert torch.equal(torch_s, d["samples_f32"])  # the float32 copy is bitwise the reference's
    # statistics of a fresh draw agree with the fixture's
    other = SShape2D(seed=7).sample_numpy(20000)
    assert np.allclose(other.mean(0), d["samples"].numpy().mean(0), atol=0.03)
    assert np.allclose(other.std(0), d["samples"].numpy().std(0), atol=0.02)


def test_sshape_prior_forwards_shape_parameters_to_sshape_numpy():
    p = SShape2D(bank_size=16, flip_y=False, skew=0.3)
    got = p.sample_numpy(64, np.random.default_rng(1))
    assert np.array_equal(got, sshape_numpy(64, np.random.default_rng(1), flip_y=False, skew=0.3))
    assert not np.allclose(got, SShape2D(bank_size=16).sample_numpy(64, np.random.default_rng(1)))
    with pytest.raises(TypeError, match="thicknes"):
        SShape2D(bank_size=16, thicknes=0.1)  # a misspelt shape parameter is refused


def test_sshape_generator_is_reproducible_and_velocity_points_to_curve():
    p = SShape2D()
    a = p.sample(10, generator=torch.Generator().manual_seed(3))
    b = p.sample(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    x_hat = p.predict_x(torch.tensor([[0.0, 0.0], [1.4, 1.4]]), torch.full((2,), 0.9))
    # the predicted clean point lies near some bank sample
    dmin = torch.cdist(x_hat, p.bank).min(1).values
    assert (dmin < 0.1).all()


def test_registry_and_entry_points(monkeypatch):
    names = list_priors()
    for n in ("gaussian", "gmm", "samples", "sshape2d", "learned", "features", "diffusion_noise"):
        assert n in names
    g = create_prior("gaussian", shape=(4,), std=2.0)
    assert isinstance(g, GaussianPrior) and g.shape == (4,)
    with pytest.raises(KeyError, match=r"unknown prior .nope.; known: \[.*'gaussian'"):
        create_prior("nope")
    with pytest.raises(KeyError):  # the registry's UnknownNameError is both
        create_prior("nope")
    assert create_prior("GAUSSIAN", shape=(2,)).shape == (2,)  # names are case-insensitive
    with pytest.raises(TypeError, match=r"create_prior expects a prior name \(str\).*int 123"):
        create_prior(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"register_prior expects a name \(str\).*int 123"):
        register_prior(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expects a class or factory"):
        register_prior("not_callable")(42)

    @register_prior("test_shifted")
    def shifted(shape=(2,), shift=1.0):
        return GaussianPrior(shape, mean=shift)

    try:
        assert create_prior("test_shifted", shift=3.0).mean[0] == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_prior("test_shifted")(lambda: None)
    finally:
        prior_base.PRIORS.unregister("test_shifted")

    # a third-party entry point is picked up lazily
    class FakeEP:
        name, value = "plugin_gauss", "pkg.mod:make"

        def load(self):
            return lambda **kw: GaussianPrior((3,), **kw)

    monkeypatch.setattr(prior_base, "_ENTRY_POINTS_LOADED", False)
    import importlib.metadata as md

    monkeypatch.setattr(md, "entry_points", lambda group: [FakeEP()] if group == "dmvae.priors" else [])
    try:
        assert "plugin_gauss" in list_priors()
        assert create_prior("plugin_gauss", std=0.5).std[0] == 0.5
    finally:
        prior_base.PRIORS.unregister("plugin_gauss")


def test_bad_inputs_raise_clear_errors():
    p = GaussianPrior((2, 3))
    with pytest.raises(ValueError, match=r"expects x_t of shape \(B, 2, 3\)"):
        p.velocity(torch.randn(4, 3, 2), torch.rand(4))
    with pytest.raises(ValueError, match="unconditional"):
        p.velocity(torch.randn(4, 2, 3), torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="t must be"):
        p.velocity(torch.randn(4, 2, 3), torch.rand(3))
    with pytest.raises(ValueError, match="std must be > 0"):
        GaussianPrior((2,), std=0.0)


@pytest.mark.parametrize("bad_t", [2.0, -0.5, 1.5, float("nan")])
def test_velocity_refuses_time_outside_unit_interval(bad_t):
    x = torch.randn(3, 2)
    for prior in (GaussianPrior((2,)), GaussianMixturePrior((2,), 3), SamplesPrior(torch.randn(8, 2))):
        for fn in (prior.velocity, prior.predict_x, prior.score, prior):
            with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
                fn(x, bad_t)
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            prior.velocity(x, torch.tensor([0.5, bad_t, 0.1]))
    assert torch.isfinite(GaussianPrior((2,)).velocity(x, torch.tensor([0.0, 1.0, 0.5]))).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(mean=float("nan")), "mean must be finite"),
    (dict(mean=float("inf")), "mean must be finite"),
    (dict(std=float("inf")), "std must be finite"),
    (dict(std=float("nan")), "std must be finite"),
    (dict(mean=torch.tensor([0.0, float("nan")])), "mean holds NaN or inf"),
])
def test_gaussian_parameters_must_be_finite(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_prior("gaussian", shape=(2,), **kwargs)


def test_gmm_parameters_must_be_finite():
    with pytest.raises(ValueError, match="means holds NaN or inf"):
        GaussianMixturePrior((2,), means=torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="stds must be finite"):
        GaussianMixturePrior((2,), 2, stds=float("inf"))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixturePrior((2,), 2, weights=torch.tensor([float("nan"), 1.0]))


def _tiny_dit(num_classes=1, dropout=0.1, hidden=32):
    from dmvae.dit import LatentDiT, LatentDiTConfig

    return LatentDiT(LatentDiTConfig(input_size=1, patch_size=1, in_channels=2, hidden_size=hidden, depth=1,
                                     num_heads=1, num_classes=num_classes, class_dropout_prob=dropout))


@pytest.mark.slow  # trains a reference model
def test_fit_reference_model_and_learned_prior():
    torch.manual_seed(0)
    target = GaussianPrior((2,), mean=torch.tensor([1.0, -0.5]), std=0.3)
    net = fit_reference_model(_tiny_dit(), target, steps=200, batch_size=128, lr=3e-3,
                              lr_schedule="cosine", generator=torch.Generator().manual_seed(0))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    lp = LearnedPrior(net, shape=(2,), num_sampling_steps=20)
    assert lp.shape == (2,) and lp.num_classes == 1
    x = torch.randn(64, 2)
    t = torch.rand(64) * 0.9
    err = (lp.velocity(x, t) - target.velocity(x, t)).abs().mean()
    base = (target.velocity(x, t) - GaussianPrior((2,)).velocity(x, t)).abs().mean()
    assert err < 0.3 * base  # learned the closed form well enough
    s = lp.sample(2000, generator=torch.Generator().manual_seed(0))
    assert (s.mean(0) - target.mean).abs().max() < 0.1
    lp.train()
    assert not lp.model.training  # the teacher is always evaluated in eval mode
    with pytest.raises(ValueError, match="elements"):
        LearnedPrior(net, shape=(3,))


class _CountingModel(torch.nn.Module):
    """Records the batch size of every call of the wrapped model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []
        self.config = inner.config
        self.null_class, self.num_classes = inner.null_class, inner.num_classes

    def forward(self, x, t, y=None, **kw):
        self.batches.append(x.shape[0])
        return self.inner(x, t, y, **kw)


def test_learned_prior_guidance_is_one_batched_forward_and_sample_uses_the_sampler():
    from dmvae.samplers import sample

    net = _tiny_dit(num_classes=3)
    with torch.no_grad():  # non-zero weights, so the labels matter
        for i, prm in enumerate(net.parameters()):
            prm.normal_(0, 0.2, generator=torch.Generator().manual_seed(i))
    counted = _CountingModel(net.eval())
    lp = LearnedPrior(counted, shape=(2,), cfg_scale=3.0, num_sampling_steps=5)
    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 0])
    v = lp.velocity(x, t, y)
    assert counted.batches == [8]  # conditional and null rows in ONE forward
    xg = x.reshape(4, 2, 1, 1)
    c, u = net(xg, t, y).reshape(4, 2), net(xg, t, torch.full((4,), 3)).reshape(4, 2)
    assert torch.allclose(v, u + 3.0 * (c - u), atol=1e-5)
    # sample() is samplers.sample: Euler, guided, one forward per step
    counted.batches.clear()
    g = torch.Generator().manual_seed(0)
    s = lp.sample(4, labels=y, generator=g)
    assert s.shape == (4, 2) and counted.batches == [8] * 5
    noise = torch.randn((4, 2, 1, 1), generator=torch.Generator().manual_seed(0))
    ref = sample(net, noise, y, num_steps=5, cfg_scale=3.0)
    assert torch.allclose(s, ref.reshape(4, 2), atol=1e-6)


def test_fit_reference_model_ema_is_returned():
    from dmvae.transport import FlowMatching

    data = GaussianPrior((2,), mean=1.0, std=0.2).sample(512, generator=torch.Generator().manual_seed(0))
    raw = _tiny_dit()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ema = fit_reference_model(raw, data, steps=30, batch_size=64, lr=1e-2, ema_decay=0.9,
                                  generator=torch.Generator().manual_seed(1))
    assert ema is not raw and not ema.training and not any(p.requires_grad for p in ema.parameters())
    diff = max((a - b).abs().max().item() for a, b in zip(ema.parameters(), raw.parameters()))
    assert diff > 0  # the average lags the trained weights
    fm = FlowMatching()
    x = data[:256].reshape(256, 2, 1, 1)
    y = torch.full((256,), raw.null_class)
    kw = dict(t=torch.rand(256, generator=torch.Generator().manual_seed(2)),
              noise=torch.randn(256, 2, 1, 1, generator=torch.Generator().manual_seed(3)))
    fresh = _tiny_dit().eval()
    with torch.no_grad():
        assert fm.loss(ema, x, y, **kw).loss < fm.loss(fresh, x, y, **kw).loss


def test_feature_prior_with_tiny_timm_backbone_and_subset():
    timm = pytest.importorskip("timm")
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    images = torch.randn(12, 3, 32, 32)
    labels = torch.tensor([0, 1, 2] * 4)
    proj = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, 4))
    backbone.train()
    p = FeaturePrior(backbone, (images, labels), projector=proj, classes=[0, 2], batch_size=5, class_conditional=True)
    assert backbone.training  # mode restored
    assert len(p) == 8 and p.shape == (4,)
    assert set(p.sample_labels.tolist()) == {0, 2}
    with torch.no_grad():
        backbone.eval()
        expect = proj(backbone.forward_features(images[labels != 1]))
    assert torch.allclose(p.samples, expect, atol=1e-5)
    # a ViT backbone: prefix (CLS) tokens are dropped
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=1, embed_dim=48,
                            num_heads=2, num_classes=0)
    pv = FeaturePrior(vit, torch.randn(3, 3, 28, 28), projector=lambda h: h.mean(1))
    assert pv.shape == (48,)


def test_diffusion_noise_prior_is_exact_mixture():
    ae = torch.nn.Conv2d(3, 2, 4, stride=4)  # any callable images -> latents
    images = torch.randn(6, 3, 8, 8)
    p = DiffusionNoisePrior(ae, images, t=0.5)
    with torch.no_grad():
        z = ae(images)
    assert torch.allclose(p.samples, 0.5 * z, atol=1e-6)
    s = p.sample(3000, generator=torch.Generator().manual_seed(0))
    assert abs(s.std().item() - math.sqrt(0.25 * z.var(unbiased=False).item() + 0.25)) < 0.05
    with pytest.raises(ValueError, match=r"t must be in \(0, 1\)"):
        DiffusionNoisePrior(ae, images, t=1.0)


def test_subclass_with_only_predict_x_gets_velocity_and_score():
    gauss = GaussianPrior((2,), mean=0.5, std=0.8)

    class ViaPredict(ReferencePrior):
        def sample(self, n, *, labels=None, generator=None, device=None):
            return gauss.sample(n, generator=generator)

        def predict_x(self, x_t, t, labels=None):
            return gauss.predict_x(x_t, t)

    class Neither(ReferencePrior):
        def sample(self, n, *, labels=None, generator=None, device=None):
            return torch.zeros(n, 2)

    p = ViaPredict((2,))
    x, t = torch.randn(6, 2), torch.rand(6) * 0.9
    assert torch.allclose(p.velocity(x, t), gauss.velocity(x, t), atol=1e-5)
    assert torch.allclose(p(x, t), gauss.velocity(x, t), atol=1e-5)
    assert torch.allclose(p.score(x, t), gauss.score(x, t), atol=1e-4)
    with pytest.raises(NotImplementedError, match="velocity\\(\\) or predict_x\\(\\)"):
        Neither((2,)).velocity(x, t)
