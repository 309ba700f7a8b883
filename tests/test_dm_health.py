"""DMHealth: the figures of a DM stage and the warnings they raise (fast, tiny networks)."""

from __future__ import annotations

import copy

import pytest
import torch
from _nets import MLPVelocity

from dmvae.dm_health import DMHealth, HealthThresholds
from dmvae.dm_loss import DistributionMatchingLoss
from dmvae.latent_stats import LatentStats
from dmvae.metrics.distribution import energy_distance
from dmvae.priors import GaussianPrior


def _tiny_dit(num_classes: int = 0, seed: int = 0):
    from dmvae.dit import LatentDiT, LatentDiTConfig

    net = LatentDiT(LatentDiTConfig(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=1,
                                    num_heads=2, num_classes=num_classes, class_dropout_prob=0.1))
    with torch.no_grad():  # the zero-initialised adaLN / output layers would make every DiT alike
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2, generator=g)
    return net


def _latents(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(seed)) * scale + shift


def test_floor_is_zero_while_the_fake_equals_the_teacher_and_flags_a_drifted_fake():
    teacher = _tiny_dit().eval().requires_grad_(False)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    dm = DistributionMatchingLoss(teacher, fake)
    z1 = _latents(32, 0)
    health = DMHealth(dm, stage1=z1, stage1_train=_latents(32, 1), fake_matches_teacher=True)
    figs = health.measure(z1, _latents(32, 1))
    assert figs["health/dm_floor_rms"] < 1e-6 and figs["health/dm_grad_rms"] < 1e-6  # float rounding only
    assert figs["health/latent_std_ratio"] == 1.0 and figs["health/latent_mean_drift"] == 0.0
    assert figs["health/energy_distance"] == figs["health/energy_distance_stage1"] == 0.0  # reference = stage 1
    assert health.warnings(figs) == []

    with torch.no_grad():  # the fake drifts away from the teacher
        for p in fake.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    drifted = health.measure(z1, _latents(32, 1))
    assert drifted["health/dm_floor_rms"] > HealthThresholds().floor_rms
    assert 0.5 < drifted["health/dm_floor_ratio"] < 2.0  # at q = p_r the encoder receives the fake error itself
    (msg,) = [w for w in health.warnings(drifted) if "drifted from the teacher" in w]
    assert "lr" in msg and "EMA" in msg and "weight decay" in msg


def test_floor_grows_with_the_fake_teacher_disagreement():
    real = GaussianPrior((4, 2, 2))
    z = real.sample(64, generator=torch.Generator().manual_seed(0))
    floors = []
    for shift in (0.0, 0.3, 1.0):
        dm = DistributionMatchingLoss(real, GaussianPrior((4, 2, 2), mean=shift))
        floors.append(DMHealth(dm, stage1=z, fake_matches_teacher=True).measure(z)["health/dm_floor_rms"])
    assert floors[0] < 1e-6 < floors[1] < floors[2], floors
    # with the update of a genuine mismatch given, the floor is also reported relative to it
    dm = DistributionMatchingLoss(real, GaussianPrior((4, 2, 2), mean=0.3))
    rel = DMHealth(dm, stage1=z, fake_matches_teacher=True, mismatch_rms=floors[2]).measure(z)
    assert rel["health/dm_floor_rel"] == pytest.approx(floors[1] / floors[2])


def test_measure_is_repeatable_and_touches_no_state():
    teacher = _tiny_dit(num_classes=3, seed=0).eval().requires_grad_(False)
    fake = _tiny_dit(num_classes=3, seed=1).train()
    dm = DistributionMatchingLoss(teacher, fake, cfg_scale=2.0)
    flags = [p.requires_grad for p in fake.parameters()]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    health = DMHealth(dm, stage1=_latents(8, 0), stage1_train=_latents(8, 1), labels=y, train_labels=y,
                      fake_matches_teacher=True)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a = health.measure(_latents(8, 2), _latents(8, 3))
    b = health.measure(_latents(8, 2), _latents(8, 3))
    assert torch.equal(torch.get_rng_state(), rng)  # fixed draws from an explicit generator
    assert a == b and all(isinstance(v, float) for v in a.values())
    assert fake.training and not teacher.training  # modes restored
    assert all(p.grad is None for p in fake.parameters()) and [p.requires_grad for p in fake.parameters()] == flags
    assert int(dm.step) == 0  # the loss's schedule counter is not advanced
    other_labels = health.measure(_latents(8, 2), _latents(8, 3), labels=torch.full((8,), 2))
    assert other_labels["health/dm_grad_rms"] != a["health/dm_grad_rms"]  # labels reach the networks


def test_prior_reference_reports_no_floor_and_measures_drift():
    real = GaussianPrior((16,))
    dm = DistributionMatchingLoss(real, MLPVelocity(16, hidden=128))
    z1 = _latents(128, 0).flatten(1)
    health = DMHealth(dm, stage1=z1)
    assert any("not a health signal" in n for n in health.notes)
    shrunk = _latents(128, 5, scale=0.8, shift=0.3).flatten(1)
    figs = health.measure(shrunk)
    assert not any("floor" in k for k in figs)
    mean1, std1 = z1.double().mean().item(), z1.double().std().item()
    assert figs["health/latent_std_ratio"] == pytest.approx(shrunk.double().std().item() / std1)
    assert figs["health/latent_mean_drift"] == pytest.approx((shrunk.double().mean().item() - mean1) / std1)
    assert figs["health/energy_distance"] == pytest.approx(energy_distance(shrunk, health.reference))
    assert figs["health/energy_distance"] > figs["health/energy_distance_stage1"]
    warnings = health.warnings(figs)
    assert any("latent std has shrunk" in w for w in warnings)
    assert any("latent mean has moved" in w for w in warnings)
    # LatentStats of stage 1 instead of its latents: the same drift figures, no stage-1 distance
    by_stats = DMHealth(dm, stage1=LatentStats().update(z1)).measure(shrunk)
    assert by_stats["health/latent_std_ratio"] == pytest.approx(figs["health/latent_std_ratio"])
    assert "health/energy_distance_stage1" not in by_stats


def test_overfit_gap_grows_when_the_fake_memorises_few_latents():
    gen = torch.Generator().manual_seed(0)
    held, few = torch.randn(64, 2, generator=gen), torch.randn(8, 2, generator=gen)
    fake = MLPVelocity(2, hidden=64)
    dm = DistributionMatchingLoss(GaussianPrior((2,)), fake)
    health = DMHealth(dm, stage1=held, stage1_train=few, draws=8)
    opt = torch.optim.Adam(fake.parameters(), lr=1e-2)
    for _ in range(150):  # memorise the 8 training latents
        loss, _ = dm.fake_loss(few, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    figs = health.measure(held, few)
    assert figs["health/fake_loss_train"] < figs["health/fake_loss_heldout"]
    assert figs["health/fake_overfit_gap"] - figs["health/fake_overfit_gap_stage1"] > HealthThresholds().overfit_gap
    assert any("over-fits its training latents" in w for w in health.warnings(figs))


def test_warning_rules():
    dm = DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,)))
    health = DMHealth(dm, fake_matches_teacher=True)
    ok = {"health/fake_loss_heldout": 1.0, "health/fake_loss_train": 0.9, "health/fake_overfit_gap": 0.11,
          "health/fake_overfit_gap_stage1": 0.05, "health/dm_grad_rms": 0.5, "health/dm_floor_rms": 0.3,
          "health/dm_floor_ratio": 0.3, "health/latent_std_ratio": 1.05, "health/latent_mean_drift": -0.05}
    assert health.warnings(ok) == []  # a high floor that is a small share of a large genuine update is fine
    assert "healthy" in health.report(ok)
    share = {**ok, "health/dm_floor_ratio": 0.9}
    assert len(health.warnings(share)) == 1
    relative = {**share, "health/dm_floor_rel": 0.1}  # measured against a genuine mismatch: below 20 %
    assert health.warnings(relative) == []
    strict = DMHealth(dm, fake_matches_teacher=True, thresholds=HealthThresholds(std_drift=0.01))
    assert [w for w in strict.warnings(ok) if "std" in w]


def test_bad_arguments():
    dm = DistributionMatchingLoss(GaussianPrior((2,)), GaussianPrior((2,)))
    with pytest.raises(TypeError, match="DistributionMatchingLoss"):
        DMHealth(GaussianPrior((2,)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference_labels must have shape"):
        DMHealth(dm, reference=torch.randn(8, 2), reference_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="latents must be a floating tensor"):
        DMHealth(dm).measure(torch.zeros(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="mismatch_rms"):
        DMHealth(dm, mismatch_rms=0.0)


@pytest.mark.slow  # runs stages 1, 2 and twice stage 3 of the examples (about a minute on 2 CPU cores)
def test_stage3_health_tells_a_drifting_fake_from_a_healthy_one(tmp_path, capsys, load_example):
    """A short real stage 3 (examples/train_dmvae.py) twice on 4 training photos: the fake at lr 1e-5
    (stays the teacher's copy, as q = p_r asks) and at lr 1e-2 (drifts); the autoencoder at lr 1e-5."""
    import json

    train_dmvae, train_reference, train_tokenizer = (
        load_example(name) for name in ("train_dmvae", "train_reference", "train_tokenizer"))
    from dmvae.training.data import SKIMAGE_PHOTOS, _skimage_photo

    for folder, names in (("train", SKIMAGE_PHOTOS[:4]), ("val", SKIMAGE_PHOTOS[4:])):
        (tmp_path / folder / "a").mkdir(parents=True)
        for n in names:
            _skimage_photo(n).save(tmp_path / folder / "a" / f"{n}.png")
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    train_tokenizer.main(["--out", str(s1), "--steps", "10", "--disc-start", "6", "--image-size", "32",
                          "--batch-size", "4", "--lpips-weight", "0", "--lr", "2e-3", "--disc-lr", "2e-3",
                          "--warmup", "2", "--ndf", "8", "--stats-batches", "2", "--quiet"])  # fmt: skip
    train_reference.main(["--vae", str(s1 / "vae_ema"), "--out", str(s2), "--steps", "3", "--batch-size", "4",
                          "--quiet"])  # fmt: skip
    common = ["--vae", str(s1 / "vae_ema"), "--real", str(s2 / "dit_ema"), "--data", str(tmp_path / "train"),
              "--val-data", str(tmp_path / "val"), "--steps", "30", "--batch-size", "4", "--lpips-weight", "0",
              "--vae-every", "2", "--disc-start", "100", "--ndf", "8", "--lr", "1e-5", "--warmup", "1",
              "--log-every", "10", "--health-every", "10", "--quiet"]  # fmt: skip
    runs = {}
    for name, fake_lr in (("healthy", "1e-5"), ("drifting", "1e-2")):
        out = tmp_path / name
        runs[name] = train_dmvae.main(["--out", str(out), "--fake-lr", fake_lr, *common])["health"]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        health_lines = [x for x in lines if "health/dm_floor_rms" in x]
        assert [x["step"] for x in health_lines] == [9, 19, 29]  # every 10 steps and the end of the stage
        assert all(k in health_lines[-1] for k in ("health/fake_overfit_gap", "health/latent_std_ratio",
                                                   "health/energy_distance"))  # fmt: skip
    assert "DM health:" in capsys.readouterr().out  # the end-of-stage line
    ok, bad = runs["healthy"]["figures"], runs["drifting"]["figures"]
    th = HealthThresholds()
    assert runs["healthy"]["warnings"] == [], runs["healthy"]["warnings"]
    assert any("drifted from the teacher" in w for w in runs["drifting"]["warnings"]), runs["drifting"]["warnings"]
    assert ok["health/dm_floor_rms"] < th.floor_rms < bad["health/dm_floor_rms"]
    assert bad["health/dm_floor_rms"] > 10 * ok["health/dm_floor_rms"]
    assert bad["health/dm_grad_rms"] > 10 * ok["health/dm_grad_rms"]  # the encoder receives the fake's error
    growth = {k: r["figures"]["health/fake_overfit_gap"] - r["figures"]["health/fake_overfit_gap_stage1"]
              for k, r in runs.items()}  # fmt: skip
    assert growth["drifting"] > growth["healthy"], growth
