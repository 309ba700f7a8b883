"""The contract every registered model preset and every registered prior keeps.

Models (``dmvae.list_models()``): the preset builds on the meta device at full size, the same
preset shrunk by a few overrides runs a forward pass, and ``save_pretrained`` /
``from_pretrained`` give back the same weights and the same outputs. Priors
(``dmvae.priors.list_priors()``): each builds from ``create_prior`` with small arguments, samples
the declared shape, gives a finite velocity of the input's shape, and its ``state_dict`` saved as
safetensors and loaded into a differently-seeded twin reproduces the velocity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dmvae
from dmvae import DMVAE, LatentDiT
from dmvae.priors import ReferencePrior, create_prior, list_priors

# ---------------------------------------------------------------------------------------- models

# A few overrides that shrink any preset of the family to a CPU-seconds model, architecture kept
# (encoder family, patch size, SwiGLU / RoPE / qk-norm switches).
TINY_OVERRIDES: dict[type, dict] = {
    DMVAE: dict(image_size=32, encoder_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}, bottleneck_dim=16,
                z_channels=4, decoder_channels=32, decoder_channel_mult=(1, 1, 1, 1), decoder_num_res_blocks=0),
    LatentDiT: dict(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3),
}


def _forward(model: torch.nn.Module) -> torch.Tensor:
    """One deterministic forward of a tiny model of either family."""
    g = torch.Generator().manual_seed(1)
    if isinstance(model, DMVAE):
        size = model.config.image_size
        return model(torch.rand(2, 3, size, size, generator=g) * 2 - 1).reconstruction
    c = model.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size, generator=g)
    return model(x, torch.tensor([0.25, 0.75]), torch.tensor([0, c.num_classes - 1]))


@functools.cache
def _family(name: str) -> type:
    with torch.device("meta"):
        return type(dmvae.create_model(name))


def test_every_family_has_tiny_overrides() -> None:
    assert {_family(name) for name in dmvae.list_models()} <= set(TINY_OVERRIDES)


@pytest.mark.parametrize("name", dmvae.list_models())
def test_preset_builds_full_size_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = dmvae.create_model(name)
    assert type(model) in TINY_OVERRIDES
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) > 1_000_000  # a real preset, not a test toy
    assert type(model.config).from_dict(model.config.to_dict()) == model.config  # config.json round trip


@pytest.mark.parametrize("name", dmvae.list_models())
def test_preset_shrunk_runs_and_round_trips(name: str, tmp_path: Path) -> None:
    family = _family(name)
    model = dmvae.create_model(name, **TINY_OVERRIDES[family]).eval()
    assert type(model) is family
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero / zero-init heads output 0: give every weight signal
            p.add_(0.1 * torch.randn_like(p))
        out = _forward(model)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    again = family.from_pretrained(tmp_path / "m")
    assert again.config == model.config and not again.training  # loaded for inference
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(_forward(again), out)


# ---------------------------------------------------------------------------------------- priors


def _tiny_dit() -> LatentDiT:
    model = LatentDiT(dmvae.LatentDiTConfig(input_size=2, patch_size=1, in_channels=2, hidden_size=16, depth=1,
                                            num_heads=2, num_classes=0, use_rope=False))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _bank(seed: int) -> torch.Tensor:
    return torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(seed))


# name -> factory(seed): small arguments for create_prior; two seeds give two different priors of one shape.
PRIOR_ARGS: dict[str, Callable[[int], dict]] = {
    "gaussian": lambda s: dict(shape=(2, 2, 2), mean=float(s), std=1.0 + s),
    "gmm": lambda s: dict(shape=(2, 2, 2), num_components=3, seed=s),
    "samples": lambda s: dict(samples=_bank(s), bandwidth=0.1),
    "features": lambda s: dict(backbone=None, data=_bank(s), projector=lambda x: 2 * x, bandwidth=0.1),
    "diffusion_noise": lambda s: dict(autoencoder=lambda x: x + 1, data=_bank(s), t=0.5),
    "sshape2d": lambda s: dict(seed=s, bank_size=64, bank_seed=s),
    "learned": lambda s: dict(model=_tiny_dit(), shape=(2, 2, 2), num_sampling_steps=2),
}


def test_every_registered_prior_has_contract_arguments() -> None:
    assert set(list_priors()) <= set(PRIOR_ARGS)


@pytest.mark.parametrize("name", list_priors())
def test_prior_samples_velocity_and_state_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    prior = create_prior(name, **PRIOR_ARGS[name](0))
    assert isinstance(prior, ReferencePrior)
    z = prior.sample(3, generator=torch.Generator().manual_seed(2))
    assert z.shape == (3, *prior.shape) and torch.isfinite(z).all()
    x_t = torch.randn(3, *prior.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.2, 0.5, 0.8])
    v = prior.velocity(x_t, t)
    assert v.shape == x_t.shape and torch.isfinite(v).all()

    state = {k: w.contiguous() for k, w in prior.state_dict().items()}
    save_file(state, str(tmp_path / "prior.safetensors"))
    torch.manual_seed(1)
    twin = create_prior(name, **PRIOR_ARGS[name](1))
    if state:  # a prior with no tensors (none today) is fully described by its arguments
        assert not torch.equal(twin.velocity(x_t, t), v)  # the twin differs until it loads the state
    twin.load_state_dict(load_file(str(tmp_path / "prior.safetensors")))
    assert torch.equal(twin.velocity(x_t, t), v)
