"""dmvae inside diffusers: AutoencoderDMVAE, DMVAETransformer2DModel, DMVAEEulerScheduler, DMVAEPipeline.

Everything runs offline on tiny configurations; the release architecture is checked on the meta
device against the reference manifests.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae import DMVAE, DMVAEConfig, LatentDiT, sample
from dmvae.files import CheckpointError
from dmvae.samplers import time_grid
from dmvae.transport import interpolate

EXTRA_HINT = 'pip install "dmvae[diffusers]"'

# Non-trivial latent statistics: a mix-up of shift and scale (or of raw and normalised latents)
# changes every number below.
LATENT_MEAN, LATENT_SCALE = 0.3, 1.7
DIT_CONFIG = {"input_size": 2, "patch_size": 1, "in_channels": 8, "hidden_size": 32, "depth": 2,
              "num_heads": 2, "num_classes": 10, "class_dropout_prob": 0.1}


@pytest.fixture(scope="module")
def integ():
    pytest.importorskip("diffusers")
    return importlib.import_module("dmvae.integrations.diffusers")


@pytest.fixture(scope="module")
def vae() -> DMVAE:
    torch.manual_seed(0)
    cfg = DMVAEConfig.from_preset("dmvae-tiny", latent_mean=LATENT_MEAN, latent_scale=LATENT_SCALE)
    return DMVAE(cfg).eval()


@pytest.fixture(scope="module")
def dit() -> LatentDiT:
    torch.manual_seed(1)
    model = LatentDiT(DIT_CONFIG).eval()
    # adaLN-Zero starts as the zero velocity: randomise every weight so the samples depend on them
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(3, 3, 32, 32, generator=g) * 2 - 1


# ---- the optional dependency ------------------------------------------------------------------


def test_missing_diffusers_names_the_extra(monkeypatch) -> None:
    """With diffusers unimportable, importing the integration fails naming the extra."""
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for name in [m for m in sys.modules if m.startswith("dmvae.integrations.diffusers")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install "dmvae\[diffusers\]"'):
        importlib.import_module("dmvae.integrations.diffusers")
    importlib.import_module("dmvae.integrations")  # the namespace itself needs nothing


@pytest.mark.slow
def test_dmvae_works_without_diffusers(tmp_path: Path) -> None:
    """In a fresh process: ``import dmvae`` never imports diffusers, and with diffusers blocked
    the library works as before while the integration names the extra."""
    code = f"""
import sys
import dmvae, torch
assert not any(m == "diffusers" or m.startswith("diffusers.") for m in sys.modules), "import dmvae imported diffusers"
sys.modules["diffusers"] = None  # now make it unimportable
from dmvae import DMVAE, LatentDiT, sample
vae = DMVAE("dmvae-tiny").eval()
x = torch.rand(1, 3, 32, 32) * 2 - 1
z = vae.encode(x)
assert vae.decode(z).shape == (1, 3, 32, 32)
dit = LatentDiT({DIT_CONFIG!r}).eval()
assert sample(dit, torch.randn(2, 8, 2, 2), [0, 1], num_steps=2, cfg_scale=2.0).shape == (2, 8, 2, 2)
import importlib, pkgutil
for info in pkgutil.walk_packages(dmvae.__path__, "dmvae."):  # every other module imports as before
    if not info.name.startswith("dmvae.integrations.diffusers") and not info.name.endswith("__main__"):
        importlib.import_module(info.name)
try:
    import dmvae.integrations.diffusers
except ImportError as e:
    print("ERROR:", e)
else:
    raise SystemExit("the integration imported without diffusers")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert EXTRA_HINT in out.stdout


# ---- AutoencoderDMVAE --------------------------------------------------------------------------


def test_autoencoder_matches_dmvae(integ, vae: DMVAE, images: torch.Tensor) -> None:
    ae = integ.AutoencoderDMVAE.from_dmvae(vae)
    assert (ae.config.shift_factor, ae.config.scaling_factor) == (LATENT_MEAN, LATENT_SCALE)
    with torch.no_grad():
        out = ae.encode(images)
        raw = out.latent_dist.mode()
        # deterministic: sample() is the mode whatever the generator
        assert torch.equal(out.latent_dist.sample(torch.Generator().manual_seed(5)), raw)
        assert torch.equal(out.latent_dist.mean, raw)
        assert torch.equal(raw, vae.encode(images, normalize=False))
        z_n = vae.encode(images)  # normalised
        # the diffusers-side normalisation gives exactly DMVAE.encode
        pipeline_side = (raw - ae.config.shift_factor) * ae.config.scaling_factor
        torch.testing.assert_close(pipeline_side, z_n, atol=1e-6, rtol=0)
        assert not torch.allclose(raw, z_n, atol=1e-2)  # the statistics are not the identity
        # decode takes raw latents: mapping a DiT's latents back reproduces DMVAE.decode
        back = z_n / ae.config.scaling_factor + ae.config.shift_factor
        torch.testing.assert_close(ae.decode(back).sample, vae.decode(z_n), atol=1e-6, rtol=0)
        torch.testing.assert_close(ae.decode(raw).sample, vae.decode(raw, normalize=False), atol=1e-6, rtol=0)
        torch.testing.assert_close(ae(images).sample, vae(images).reconstruction, atol=1e-6, rtol=0)
        assert torch.equal(ae.normalize_latents(raw), vae.normalize_latents(raw))
        assert torch.equal(ae.denormalize_latents(z_n), vae.denormalize_latents(z_n))
    assert out.latent_dist.kl().shape == (images.shape[0],) and not out.latent_dist.kl().any()
    assert ae.encode(images, return_dict=False)[0].mode().shape == raw.shape


def test_autoencoder_conversion_is_lossless(integ, vae: DMVAE) -> None:
    ae = integ.AutoencoderDMVAE.from_dmvae(vae)
    ours, theirs = vae.state_dict(), ae.state_dict()
    assert list(theirs) == list(ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # a copy, not a view: training one must not move the other
    assert all(ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)
    back = ae.to_dmvae()
    assert back.config == vae.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.items())
    with pytest.raises(TypeError, match="DMVAE"):
        integ.AutoencoderDMVAE.from_dmvae(ae)
    # every DMVAEConfig field has its constructor argument (three renamed), and nothing else
    import inspect

    params = [p for p in inspect.signature(integ.AutoencoderDMVAE.__init__).parameters if p != "self"]
    renamed = {"encoder": "encoder_name", "latent_mean": "shift_factor", "latent_scale": "scaling_factor"}
    assert sorted(params) == sorted(renamed.get(f, f) for f in vae.config.to_dict())


def test_autoencoder_save_load_round_trip(integ, vae: DMVAE, images: torch.Tensor, tmp_path: Path) -> None:
    ae = integ.AutoencoderDMVAE.from_dmvae(vae)
    ae.save_pretrained(tmp_path / "repo" / "vae")
    cfg = json.loads((tmp_path / "repo" / "vae" / "config.json").read_text())
    assert (cfg["shift_factor"], cfg["scaling_factor"]) == (LATENT_MEAN, LATENT_SCALE)
    direct = integ.AutoencoderDMVAE.from_pretrained(tmp_path / "repo" / "vae")
    nested = integ.AutoencoderDMVAE.from_pretrained(tmp_path / "repo", subfolder="vae")
    with torch.no_grad():
        expected = vae.encode(images)
        for loaded in (direct, nested):
            z = loaded.encode(images).latent_dist.sample()
            torch.testing.assert_close(loaded.normalize_latents(z), expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z, normalize=False), atol=1e-6, rtol=0)
        assert loaded.to_dmvae().config == vae.config


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "mismatched"])
def test_autoencoder_loading_is_strict(integ, vae: DMVAE, tmp_path: Path, problem: str) -> None:
    integ.AutoencoderDMVAE.from_dmvae(vae).save_pretrained(tmp_path / "vae")
    key = "decoder.conv_out.bias"
    if problem == "missing":
        _rewrite_weights(tmp_path / "vae", lambda s: s.pop(key))
    elif problem == "unexpected":
        _rewrite_weights(tmp_path / "vae", lambda s: s.__setitem__("decoder.extra.weight", torch.zeros(2)))
    else:
        _rewrite_weights(tmp_path / "vae", lambda s: s.__setitem__(key, torch.zeros(5)))
    expected = {"missing": key, "unexpected": "decoder.extra.weight", "mismatched": key}[problem]
    with pytest.raises((CheckpointError, ValueError, RuntimeError), match=expected.replace(".", r"\.")):
        # ignore_mismatched_sizes would make diffusers skip a wrong shape silently
        integ.AutoencoderDMVAE.from_pretrained(tmp_path, subfolder="vae", ignore_mismatched_sizes=True)


def test_autoencoder_slicing_and_tiling(integ, vae: DMVAE) -> None:
    """The switches reach DMVAE's own slicing and tiling (same results as a DMVAE set alike)."""
    ae = integ.AutoencoderDMVAE.from_dmvae(vae)
    twin = DMVAE(vae.config).eval()
    twin.load_state_dict(vae.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x).latent_dist.mode()
        whole = ae.decode(z).sample
        ae.enable_slicing(2)
        twin.enable_slicing(2)
        assert ae.use_slicing and not ae.use_tiling
        torch.testing.assert_close(ae.encode(x).latent_dist.mode(), twin.encode(x, normalize=False), atol=1e-6, rtol=0)
        torch.testing.assert_close(ae.decode(z).sample, twin.decode(z, normalize=False), atol=1e-6, rtol=0)
        # batch slicing changes only the kernels' summation order
        torch.testing.assert_close(ae.decode(z).sample, whole, atol=1e-4, rtol=0)
        ae.disable_slicing()
        twin.disable_slicing()
        ae.enable_tiling(tile_size=2, overlap=1)
        twin.enable_tiling(tile_size=2, overlap=1)
        tiled = ae.decode(z).sample
        assert ae.use_tiling and (tiled - whole).abs().max() > 1e-3  # tiling is really on
        torch.testing.assert_close(tiled, twin.decode(z, normalize=False), atol=1e-6, rtol=0)
        ae.disable_tiling()
        torch.testing.assert_close(ae.decode(z).sample, whole, atol=1e-6, rtol=0)


def test_diffusers_transformer_trains_on_dmvae_latents(integ, vae: DMVAE) -> None:
    """The glue of docs/diffusers.md: a stock diffusers DiT trained on normalised DMVAE latents
    (diffusers' flow-matching convention: x = (1 - sigma) x0 + sigma noise, target noise - x0)."""
    from diffusers import DiTTransformer2DModel

    ae = integ.AutoencoderDMVAE.from_dmvae(vae).requires_grad_(False)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8,
                                  num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        z = ae.encode(x).latent_dist.sample()
        latents = (z - ae.config.shift_factor) * ae.config.scaling_factor
    torch.testing.assert_close(latents, vae.encode(x), atol=1e-6, rtol=0)
    noise = torch.randn_like(latents)
    sigma = torch.rand(2)
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
    pred = model(noisy, timestep=sigma * 1000, class_labels=labels).sample
    loss = torch.nn.functional.mse_loss(pred[:, :8], noise - latents)
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---- DMVAETransformer2DModel --------------------------------------------------------------------


def test_transformer_is_the_latent_dit(integ, dit: LatentDiT, tmp_path: Path) -> None:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.utils import PushToHubMixin

    cls = integ.DMVAETransformer2DModel
    tr = cls.from_latent_dit(dit)
    assert isinstance(tr, LatentDiT) and isinstance(tr, ModelMixin)
    assert tr.latent_dit_config() == dit.config
    assert tr.config.grid_size == dit.config.grid_size and tr.null_class == dit.null_class
    assert list(tr.state_dict()) == list(dit.state_dict())
    x, t, y = torch.randn(3, 8, 2, 2), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        assert torch.equal(tr(x, t, y), dit(x, t, y))
    # every constructor argument is a LatentDiTConfig field and back
    import inspect

    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert params == list(dit.config.to_dict())
    # where LatentDiT's side (HubMixin) and diffusers' mixins both define a name, diffusers' wins
    from dmvae.hub import HubMixin

    diffusers_names = set(vars(ModelMixin)) | set(vars(ConfigMixin)) | set(vars(PushToHubMixin))
    shared = {n for n in set(vars(HubMixin)) & diffusers_names if not n.startswith("__")}
    assert {"from_pretrained", "save_pretrained"} <= shared
    for name in sorted(shared):
        owner = next(c for c in cls.__mro__ if name in vars(c))
        assert owner in (ModelMixin, ConfigMixin, PushToHubMixin) or owner.__module__.startswith(
            "dmvae.integrations"), (name, owner)
    tr.save_pretrained(tmp_path / "transformer")
    loaded = cls.from_pretrained(tmp_path, subfolder="transformer")
    assert loaded.latent_dit_config() == dit.config
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), dit(x, t, y))
        assert torch.equal(loaded.to_latent_dit()(x, t, y), dit(x, t, y))
    _rewrite_weights(tmp_path / "transformer", lambda s: s.pop("final_layer.linear.bias"))
    with pytest.raises(CheckpointError, match=r"final_layer\.linear\.bias"):
        cls.from_pretrained(tmp_path, subfolder="transformer")


# ---- DMVAEEulerScheduler --------------------------------------------------------------------------


def test_scheduler_steps_on_the_dmvae_grid(integ) -> None:
    sched = integ.DMVAEEulerScheduler(shift=3.0)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros(1), 0.0, torch.zeros(1))
    sched.set_timesteps(5)
    grid = time_grid(5, 3.0)
    assert torch.equal(sched.timesteps, grid[:-1]) and torch.equal(sched.time_grid, grid)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    for k, t in enumerate(sched.timesteps):
        out = sched.step(v, t, x).prev_sample
        assert torch.equal(out, x + (grid[k + 1] - grid[k]) * v)
        x = out
    with pytest.raises(RuntimeError, match="steps have been taken"):
        sched.step(v, 1.0, x)
    x1, x0, t = torch.randn(3, 2), torch.randn(3, 2), torch.rand(3)
    assert torch.equal(sched.add_noise(x1, x0, t), interpolate(x1, x0, t))
    with pytest.raises(ValueError, match="shift"):
        integ.DMVAEEulerScheduler(shift=0.0)


# ---- DMVAEPipeline ------------------------------------------------------------------------------


def _reference(dit: LatentDiT, vae: DMVAE, noise, labels, steps, **kw) -> torch.Tensor:
    """dmvae's own sampler + decode, mapped to [0, 1]."""
    z = sample(dit, noise, torch.tensor(labels), num_steps=steps, method="euler", **kw)
    return (vae.decode(z) / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("kw", [
    {"cfg_scale": 1.0},
    {"cfg_scale": 2.5},
    {"cfg_scale": 4.0, "cfg_interval": (0.3, 0.8), "time_shift": 3.0},
    {"cfg_scale": 1.5, "guidance_channels": 3, "time_shift": 0.5},
])
def test_pipeline_matches_dmvae_sampler(integ, dit: LatentDiT, vae: DMVAE, kw: dict) -> None:
    kw = dict(kw)
    pipe = integ.DMVAEPipeline.from_dmvae(dit, vae, time_shift=kw.pop("time_shift", 1.0))
    pipe.set_progress_bar_config(disable=True)
    labels, steps = [1, 7, 3], 6
    noise = torch.randn(3, 8, 2, 2, generator=torch.Generator().manual_seed(4))
    images = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=kw["cfg_scale"],
                  cfg_interval=kw.get("cfg_interval"), guidance_channels=kw.get("guidance_channels"),
                  latents=noise, output_type="pt").images
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    expected = _reference(dit, vae, noise, labels, steps, time_shift=pipe.scheduler.config.shift, **kw)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_pipeline_with_diffusers_flow_match_scheduler(integ, dit: LatentDiT, vae: DMVAE, shift: float) -> None:
    """diffusers' own FlowMatchEulerDiscreteScheduler (sigma = 1 - t, velocity -v) in place of
    dmvae's: the same ODE on the same grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = integ.DMVAEPipeline.from_dmvae(dit, vae)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(8))
    images = pipe([6, 2], num_inference_steps=5, guidance_scale=2.0, cfg_interval=(0.2, 1.0), latents=noise,
                  output_type="pt").images
    expected = _reference(dit, vae, noise, [6, 2], 5, cfg_scale=2.0, cfg_interval=(0.2, 1.0), time_shift=shift)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        pipe([6], num_inference_steps=2)


def test_pipeline_guidance_changes_the_images(integ, dit: LatentDiT, vae: DMVAE) -> None:
    """The comparison above is not vacuous: guidance and labels move the output."""
    pipe = integ.DMVAEPipeline.from_dmvae(dit, vae)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(4))
    run = lambda labels, s: pipe(labels, num_inference_steps=4, guidance_scale=s, latents=noise,
                                 output_type="latent").images
    assert (run([1, 2], 1.0) - run([1, 2], 3.0)).abs().max() > 1e-3
    assert (run([1, 2], 1.0) - run([5, 6], 1.0)).abs().max() > 1e-3


def test_pipeline_output_types_and_errors(integ, dit: LatentDiT, vae: DMVAE) -> None:
    pipe = integ.DMVAEPipeline.from_dmvae(dit, vae)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator().manual_seed(9)
    pt = pipe([2, 5], num_inference_steps=3, generator=gen(), output_type="pt").images
    arr = pipe([2, 5], num_inference_steps=3, generator=gen(), output_type="np").images
    pil = pipe([2, 5], num_inference_steps=3, generator=gen()).images
    (tup,) = pipe([2, 5], num_inference_steps=3, generator=gen(), output_type="pt", return_dict=False)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-7)
    assert torch.equal(tup, pt)
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in pil)
    assert np.abs(np.asarray(pil[0], dtype=np.float32) / 255 - arr[0]).max() <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="class_labels"):
        pipe([10], num_inference_steps=2)  # 10 is the null class, not a class
    with pytest.raises(ValueError, match="latents"):
        pipe([1, 2], num_inference_steps=2, latents=torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], num_inference_steps=2, output_type="jpeg")
    no_null = LatentDiT({**DIT_CONFIG, "class_dropout_prob": 0.0})
    with pytest.raises(ValueError, match="null class"):
        integ.DMVAEPipeline.from_dmvae(no_null, vae)([1], num_inference_steps=2, guidance_scale=2.0)


def test_pipeline_save_load_reproduces(integ, dit: LatentDiT, vae: DMVAE, tmp_path: Path) -> None:
    pipe = integ.DMVAEPipeline.from_dmvae(dit, vae, time_shift=2.0)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(6))
    call = {"class_labels": [4, 0], "num_inference_steps": 5, "guidance_scale": 2.0, "latents": noise,
            "output_type": "pt"}
    expected = pipe(**call).images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert {k for k in index if not k.startswith("_")} == {"transformer", "vae", "scheduler"}
    loaded = integ.DMVAEPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.shift == 2.0
    assert loaded.vae.config.scaling_factor == LATENT_SCALE
    torch.testing.assert_close(loaded(**call).images, expected, atol=1e-6, rtol=0)
    # a dtype asked for reaches every component (torch_dtype: the spelling every diffusers knows)
    half = integ.DMVAEPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.transformer.dtype == half.vae.dtype == torch.bfloat16
    assert {p.dtype for p in half.vae.parameters()} == {torch.bfloat16}
    images = half(**call).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


# ---- the release architecture ------------------------------------------------------------------------


@pytest.mark.slow
def test_release_converts_to_pipeline_on_meta(integ, fixtures_dir: Path) -> None:
    """dmvae-l + LightningDiT-XL/1 (no weights: meta device) -> a pipeline whose components'
    state dicts are the release checkpoints' key for key, shape for shape."""
    manifests = fixtures_dir / "manifests"
    with torch.device("meta"):
        vae = DMVAE("dmvae-l")
        dit = LatentDiT("LightningDiT-XL/1", num_classes=1000)
    pipe = integ.DMVAEPipeline.from_dmvae(dit, vae)
    assert pipe.vae.device.type == "meta" and pipe.transformer.device.type == "meta"
    vae_expected = json.loads((manifests / "vae_large_z32.json").read_text())
    dit_expected = json.loads((manifests / "lightningdit_xl1_in32_s16.json").read_text())
    vae_got = {k: list(v.shape) for k, v in pipe.vae.state_dict().items()}
    assert vae_got == vae_expected
    dit_got = [(k, list(v.shape)) for k, v in pipe.transformer.state_dict().items()]
    assert dit_got == list(dit_expected.items())
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.0685, 0.1763)
