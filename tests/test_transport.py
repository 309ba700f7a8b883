"""Flow-matching transport: reference parity (dmd fixture), time maps, conversions, guidance."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.transport import (
    FlowMatching,
    FlowMatchingConfig,
    apply_guidance,
    data_from_velocity,
    interpolate,
    noise_from_velocity,
    sample_time,
    score_from_velocity,
    shift_time,
    velocity_from_data,
    velocity_from_score,
)


@pytest.fixture(scope="module")
def student(fixtures_dir) -> LatentDiT:
    kwargs = json.loads((fixtures_dir / "dit" / "manifest.json").read_text())["constructor_kwargs"]
    return LatentDiT.from_pretrained(fixtures_dir / "dit" / "ckpt.pt", config=kwargs, use_ema=True)


@pytest.fixture(scope="module")
def dmd(fixtures_dir):
    return load_file(fixtures_dir / "dmd" / "dmd.safetensors")


def test_training_loss_parity_eval(student, dmd, max_abs):
    student.eval()
    t = dmd["train/t"]
    assert max_abs(interpolate(dmd["latents"], dmd["noise_x0"], t), dmd["train/xt"]) <= 1e-6
    with torch.no_grad():
        out = FlowMatching().loss(student, dmd["latents"], dmd["labels"], t=t, noise=dmd["noise_x0"])
        pred = student(dmd["train/xt"], t, dmd["labels"])
    assert max_abs(pred, dmd["train/pred"]) <= 1e-4
    assert max_abs(out.per_sample, dmd["train/loss_per_sample"]) <= 1e-4
    assert max_abs(out.loss, dmd["train/loss_mean"]) <= 1e-4
    loss, per_sample = out  # unpacks as (mean, per-sample)
    assert loss.shape == () and per_sample.shape == (4,)


def test_training_loss_parity_label_dropout(student, dmd, max_abs):
    """Train mode with the reference's dropout draw injected: drop where drop_uniform < 0.1."""
    student.train()
    try:
        drop = dmd["train_labeldrop/drop_uniform"] < student.config.class_dropout_prob
        with torch.no_grad():
            out = FlowMatching().loss(student, dmd["latents"], dmd["labels"], t=dmd["train/t"],
                                      noise=dmd["noise_x0"], force_drop_ids=drop)
        dropped = student.y_embedder.drop_labels(dmd["labels"], True, drop)
    finally:
        student.eval()
    assert torch.equal(dropped, dmd["train_labeldrop/effective_labels"])
    assert max_abs(out.per_sample, dmd["train_labeldrop/loss_per_sample"]) <= 1e-4
    assert max_abs(out.loss, dmd["train_labeldrop/loss_mean"]) <= 1e-4
    assert max_abs(out.per_sample, dmd["train/loss_per_sample"]) > 1e-3  # the drop mattered


def test_dmd_fixture_x1_prediction(student, dmd, max_abs):
    """pred_student = x_t + (1 - t) v, the clean-data estimate used by the DM loss."""
    t, xt = dmd["cfg1/t"], dmd["cfg1/xt"]
    with torch.no_grad():
        v = student(xt, t, dmd["labels"])
    assert max_abs(data_from_velocity(xt, v, t), dmd["cfg1/pred_student"]) <= 1e-4


def test_shift_time_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1
    assert (s[1:-1] < t[1:-1]).all()  # s > 1 moves times toward the noise (t = 0)
    assert (torch.diff(s) > 0).all()
    # closed form at t = 0.5: 1 - s*0.5 / (1 + (s-1)*0.5)
    assert s[50].item() == pytest.approx(1 - 1.5 / 2.0)
    # the inverse map is the shift by 1/s
    assert torch.allclose(shift_time(s, 1 / 3.0), t, atol=1e-12)
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, 0.0)


def test_sample_time_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_time(20000, generator=g)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    ln = sample_time(20000, method="logit_normal", mean=0.5, std=1.0, generator=g)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    shifted = sample_time(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    plain = sample_time(20000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_time(plain, 3.0))
    with pytest.raises(ValueError, match="logit_normal"):
        sample_time(4, method="cosine")  # type: ignore[arg-type]


def test_conversions_round_trip_and_singular_points():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    xt, v = interpolate(x1, x0, t), x1 - x0
    assert torch.allclose(data_from_velocity(xt, v, t), x1)
    assert torch.allclose(noise_from_velocity(xt, v, t), x0)
    score = score_from_velocity(xt, v, t)
    # for the linear path with the true velocity, score = -x0 / (1 - t)
    assert torch.allclose(score, -x0 / (1 - t).view(3, 1, 1, 1))
    assert torch.allclose(velocity_from_score(xt, score, t), v)
    assert torch.allclose(velocity_from_data(xt, x1, t), v)
    # singular points stay finite
    t_edge = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    xe = interpolate(x1, x0, t_edge)
    for out in (score_from_velocity(xe, v, t_edge), velocity_from_score(xe, v, t_edge),
                velocity_from_data(xe, x1, t_edge)):
        assert torch.isfinite(out).all()


def test_loss_is_deterministic_and_matches_manual():
    torch.manual_seed(0)
    model = LatentDiT(LatentDiTConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=32,
                                      depth=1, num_heads=2, num_classes=3)).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x1, y = torch.randn(5, 4, 4, 4), torch.tensor([0, 1, 2, 3, 0])
    fm = FlowMatching(time_sampling="logit_normal")
    a = fm.loss(model, x1, y, generator=torch.Generator().manual_seed(3))
    b = fm.loss(model, x1, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.per_sample, b.per_sample, rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x1.shape, generator=g)  # noise first, then t (the reference's order)
    t = fm.sample_time(5, generator=g)
    with torch.no_grad():
        pred = model(t.view(5, 1, 1, 1) * x1 + (1 - t.view(5, 1, 1, 1)) * noise, t, y)
    manual = ((pred - (x1 - noise)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(a.per_sample, manual, rtol=1e-6, atol=1e-6)
    assert a.loss.item() == pytest.approx(manual.mean().item(), rel=1e-6)


def test_loss_bad_inputs():
    fm = FlowMatching()
    model = lambda x, t, y: x  # noqa: E731
    x1 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="noise must have the shape"):
        fm.loss(model, x1, None, noise=torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fm.loss(model, x1, None, t=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="shape"):
        fm.loss(model, x1, None, t=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatchingConfig(time_sampling="beta")


def test_apply_guidance_channels_and_interval():
    g = torch.Generator().manual_seed(2)
    c, u = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    first, second = apply_guidance(c, u, 3.0)
    torch.testing.assert_close(first, u + 3.0 * (c - u))
    assert first is second
    f3, s3 = apply_guidance(c, u, 3.0, guidance_channels=3)
    torch.testing.assert_close(f3[:, :3], first[:, :3])
    torch.testing.assert_close(f3[:, 3:], c[:, 3:])
    torch.testing.assert_close(s3[:, 3:], u[:, 3:])
    fi, _ = apply_guidance(c, u, 3.0, torch.tensor([0.1, 0.5]), cfg_interval=(0.2, 0.8))
    torch.testing.assert_close(fi[0], c[0])
    torch.testing.assert_close(fi[1], first[1])
    with pytest.raises(ValueError, match="guidance_channels"):
        apply_guidance(c, u, 3.0, guidance_channels=6)
    with pytest.raises(ValueError, match="cfg_interval"):
        apply_guidance(c, u, 3.0, torch.tensor([0.1, 0.5]), cfg_interval=(0.8, 0.2))
