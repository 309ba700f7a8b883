"""DMVAE model, config, presets, encode/decode API and errors (tiny configs, CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmvae.autoencoder import DMVAE, DMVAEConfig, DMVAEOutput, grid_to_tokens, tokens_to_grid
from dmvae.files import CheckpointError


# A 32x32 input is a 2x2 latent grid: the cheapest size that exercises everything.
SMALL = 32


@pytest.fixture(scope="module")
def tiny() -> DMVAE:
    torch.manual_seed(0)
    return DMVAE("dmvae-tiny").eval()


def _images(b: int, h: int = SMALL, w: int = SMALL, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ---- architecture contract -------------------------------------------------------------------


@pytest.mark.parametrize("preset,manifest", [("dmvae-l", "vae_large_z32.json"), ("dmvae-b", "vae_base_z16.json")])
def test_release_presets_match_reference_manifests(fixtures_dir: Path, preset: str, manifest: str) -> None:
    expected = json.loads((fixtures_dir / "manifests" / manifest).read_text())
    with torch.device("meta"):
        model = DMVAE(preset)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected)), sorted(set(expected) - set(ours)))
    assert ours == expected
    index = json.loads((fixtures_dir / "manifests" / "index.json").read_text())["files"][manifest]
    assert sum(p.numel() for p in model.parameters()) == index["num_parameters"]
    assert model.parameter_counts()["total"] == index["num_parameters"]


def test_docs_preset_table_matches_the_presets(repo_root: Path) -> None:
    """docs/autoencoder.md's preset table (encoder, z, latent statistics, parameter count) is what
    each preset builds (the architecture itself is checked against the reference manifests above)."""
    rows = [line.split("|")[1:-1] for line in (repo_root / "docs" / "autoencoder.md").read_text().splitlines()
            if line.startswith("| `dmvae-")]  # fmt: skip
    import dmvae

    assert {r[0].strip().strip("`") for r in rows} == {n for n in dmvae.list_models() if n.startswith("dmvae-")}
    for name, encoder, z, stats, params, _ in ([c.strip() for c in r] for r in rows):
        cfg = DMVAEConfig.from_preset(name.strip("`"))
        if encoder.startswith("`"):
            assert encoder.split("`")[1] == cfg.encoder
        assert int(z) == cfg.z_channels
        assert [float(v) for v in stats.split("/")] == [cfg.latent_mean, cfg.latent_scale]
        with torch.device("meta"):
            model = DMVAE(cfg)
        assert int(params.replace(",", "")) == sum(p.numel() for p in model.parameters())


def test_initialisation_follows_the_reference(tiny: DMVAE) -> None:
    convs = [m for m in tiny.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert 0.015 < weights.std().item() < 0.025  # trunc_normal(std=0.02) cut at +-2 (never reached)
    assert all(torch.all(m.bias == 0) for m in convs)
    assert all(torch.all(m.bias == 0) for m in tiny.bottle_neck.modules() if isinstance(m, torch.nn.Linear))
    norms = [m for m in tiny.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)


# ---- config ------------------------------------------------------------------------------------


def test_config_json_round_trip(tmp_path: Path) -> None:
    cfg = DMVAEConfig.from_preset("dmvae-tiny", latent_mean=0.1, latent_scale=0.5)
    again = DMVAEConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and isinstance(again.decoder_channel_mult, tuple)
    cfg.save(tmp_path / "config.json")
    assert DMVAEConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match="unknown DMVAEConfig field"):
        DMVAEConfig.from_dict({**cfg.to_dict(), "z_chanels": 4})


def test_presets_and_unknown_preset() -> None:
    names = DMVAEConfig.preset_names()
    assert {"dmvae-l", "dmvae-b", "dmvae-tiny"} <= set(names)
    assert DMVAEConfig.from_preset("dmvae-tiny", z_channels=4).z_channels == 4
    with pytest.raises(KeyError, match=r"unknown DMVAE preset 'dmvae-xl'.*dmvae-b.*dmvae-l.*dmvae-tiny"):
        DMVAEConfig.from_preset("dmvae-xl")
    with pytest.raises(KeyError, match="unknown DMVAE preset"):
        DMVAE("nope")
    with pytest.raises(TypeError, match="config must be a DMVAEConfig"):
        DMVAE(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"image_size": 250}, r"image_size must be a multiple of patch_size=16, got 250"),
        ({"patch_size": 8}, r"2 \*\* len\(decoder_channel_mult\) = 16 but patch_size is 8"),
        ({"decoder_channels": 24}, "not divisible by 32"),
        ({"decoder_channel_mult": ()}, "non-empty tuple"),
        ({"z_channels": 0}, "z_channels must be a positive int, got 0"),
        ({"latent_scale": 0.0}, "latent_scale must be non-zero"),
        ({"latent_mean": float("nan")}, "latent_mean must be a finite number"),
        ({"encoder_kwargs": {"img_size": 224}}, r"may not set \['img_size'\]"),
        ({"decoder_num_res_blocks": -1}, "decoder_num_res_blocks must be an int >= 0"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DMVAEConfig.from_preset("dmvae-tiny", **overrides)


# ---- encode / decode ----------------------------------------------------------------------------


def test_encode_decode_shapes_any_multiple_of_patch(tiny: DMVAE) -> None:
    x = _images(2, 48, 32)
    z = tiny.encode(x)
    assert z.shape == (2, 8, 3, 2) and z.dtype == torch.float32 and z.is_contiguous()
    assert tiny.latent_shape(48, 32) == (8, 3, 2)
    rec = tiny.decode(z)
    assert rec.shape == (2, 3, 48, 32) and rec.dtype == torch.float32
    out = tiny(x)
    assert isinstance(out, DMVAEOutput)
    assert torch.equal(out.latents, tiny.encode(x, normalize=False))
    assert torch.equal(out.normalized_latents, tiny.normalize_latents(out.latents))
    assert out.reconstruction.shape == x.shape


def test_grid_layout_is_row_major(tiny: DMVAE) -> None:
    """Latent (i, j) comes from patch (i, j): changing one patch changes only its latent column."""
    x = _images(1, 48, 32)
    y = x.clone()
    y[:, :, 16:32, 0:16] = -y[:, :, 16:32, 0:16]  # patch row 1, column 0
    with torch.no_grad():
        tokens_x = tiny.bottle_neck(tiny.encoder(x))
        tokens_y = tiny.bottle_neck(tiny.encoder(y))
        grid_x = tiny.encode(x, normalize=False)
    assert torch.allclose(grid_to_tokens(grid_x), tokens_x, atol=1e-6)
    assert torch.equal(tokens_to_grid(tokens_x, 3, 2), grid_x)
    changed = (tokens_x - tokens_y).abs().amax(-1)[0]  # (6,) per token
    assert changed.argmax().item() == 1 * 2 + 0  # row-major index of (1, 0)


@pytest.mark.parametrize("size", [256, 384])
def test_real_photos_round_trip(tiny: DMVAE, size: int) -> None:
    data = pytest.importorskip("skimage.data")
    from dmvae.image import pil_to_tensor

    photos = [data.astronaut(), data.chelsea()]  # 512x512 and 300x451
    from PIL import Image

    x = pil_to_tensor([Image.fromarray(p) for p in photos], size=size)
    assert x.shape == (2, 3, size, size) and -1 <= x.min() and x.max() <= 1
    with torch.no_grad():
        z = tiny.encode(x)
        assert z.shape == (2, 8, size // 16, size // 16) and torch.isfinite(z).all()
        rec = tiny.decode(z[:1])  # one image keeps the decoder cost small
    assert rec.shape == (1, 3, size, size) and torch.isfinite(rec).all()
    assert rec.std() > 0


def test_dynamic_img_size_is_bitwise_neutral_at_training_size(tiny: DMVAE) -> None:
    """The reference builds timm with dynamic_img_size=False; at 256 px ours must be identical."""
    import timm

    static = timm.create_model(
        "vit_base_patch14_dinov2.lvd142m", pretrained=False, patch_size=16, img_size=256,
        num_classes=0, embed_dim=96, depth=2, num_heads=2,
    ).eval()
    static.load_state_dict(tiny.encoder.model.state_dict(), strict=True)
    x = _images(1, 256, 256)
    with torch.no_grad():
        expected = static.forward_features((x * 0.5 + 0.5 - tiny.encoder.scale.mean) / tiny.encoder.scale.std)
        assert torch.equal(tiny.encode_features(x), expected[:, 1:])


def test_pos_embed_stays_at_training_grid(tiny: DMVAE) -> None:
    assert tuple(tiny.state_dict()["encoder.model.pos_embed"].shape) == (1, 257, 96)
    with torch.no_grad():
        z = tiny.encode(_images(1, 64, 96))  # resampled on the fly, not stored
    assert z.shape == (1, 8, 4, 6)
    assert tuple(tiny.state_dict()["encoder.model.pos_embed"].shape) == (1, 257, 96)


def test_reconstruct_pil(tiny: DMVAE) -> None:
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((40, 70, 3)) * 255).astype(np.uint8))
    model = DMVAE(DMVAEConfig.from_preset("dmvae-tiny", image_size=32)).eval()
    out = model.reconstruct(img)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].size == (32, 32) and out[0].mode == "RGB"
    two = model.reconstruct([img, img.convert("L")])
    assert len(two) == 2


def test_encode_is_differentiable(tiny: DMVAE) -> None:
    model = DMVAE("dmvae-tiny")
    x = _images(2)
    z = model.encode(x)
    assert z.requires_grad
    z.square().mean().backward()
    for name in ("encoder.model.patch_embed.proj.weight", "encoder.model.blocks.0.attn.qkv.weight", "bottle_neck.mlp.0.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()
    model(x).reconstruction.mean().backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.encoder.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_freeze_switches() -> None:
    model = DMVAE("dmvae-tiny").freeze_encoder()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    model.freeze_decoder().freeze_bottleneck()
    assert not any(p.requires_grad for p in model.parameters())
    model.freeze_encoder(False)
    assert all(p.requires_grad for p in model.encoder.parameters())


def test_slicing_matches_one_batch(tiny: DMVAE, max_abs) -> None:
    x = _images(5)
    with torch.no_grad():
        z_full = tiny.encode(x)
        rec_full = tiny.decode(z_full)
        tiny.enable_slicing()
        try:
            z_sliced = tiny.encode(x)
            rec_sliced = tiny.decode(z_full)
        finally:
            tiny.disable_slicing()
        z_chunk2 = tiny.encode(x, chunk_size=2)
    assert max_abs(z_full, z_sliced) <= 1e-5 and max_abs(z_full, z_chunk2) <= 1e-5
    assert max_abs(rec_full, rec_sliced) <= 1e-5
    assert tiny.slice_size is None
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        tiny.enable_slicing(0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        tiny.encode(x, chunk_size=-1)


def test_normalize_denormalize_inverse(max_abs) -> None:
    model = DMVAE(DMVAEConfig.from_preset("dmvae-tiny", latent_mean=0.0685, latent_scale=0.1763))
    z = torch.randn(2, 8, 3, 3) * 5
    z_n = model.normalize_latents(z)
    assert torch.allclose(z_n, (z - 0.0685) * 0.1763)
    assert torch.allclose(model.denormalize_latents(z_n), z, atol=1e-5)
    x = _images(1)
    with torch.no_grad():
        raw = model.encode(x, normalize=False)
        assert torch.allclose(model.encode(x), (raw - 0.0685) * 0.1763, atol=1e-6)
        assert max_abs(model.decode(model.normalize_latents(raw)), model.decode(raw, normalize=False)) <= 1e-5


def test_dtype_and_autocast(tiny: DMVAE, max_abs) -> None:
    x = _images(1)
    with torch.no_grad():
        ref = tiny.decode(tiny.encode(x.double()))  # float64 input is cast to the model dtype
        assert ref.dtype == torch.float32
        bf16 = DMVAE("dmvae-tiny").eval()
        bf16.load_state_dict(tiny.state_dict())
        bf16.to(torch.bfloat16)
        z = bf16.encode(x)
        rec = bf16.decode(z)
        assert z.dtype == torch.float32 and rec.dtype == torch.float32
        assert max_abs(rec, ref) < 0.5 * ref.abs().max().item()  # same function, bf16 precision
        auto = tiny.decode(tiny.encode(x, autocast=True), autocast=True)
        assert auto.dtype == torch.float32 and max_abs(auto, ref) < 0.5 * ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_move_and_autocast(tiny: DMVAE, max_abs) -> None:
    model = DMVAE("dmvae-tiny").eval()
    model.load_state_dict(tiny.state_dict())
    x = _images(2)
    with torch.no_grad():
        ref = model.decode(model.encode(x))
        model.cuda()
        z = model.encode(x)  # CPU input follows the model
        assert z.device.type == "cuda" and z.dtype == torch.float32
        rec = model.decode(z.cpu())
        assert rec.device.type == "cuda" and max_abs(rec.cpu(), ref) < 1e-3
        auto = model.decode(model.encode(x, autocast=True), autocast=True)
        assert auto.dtype == torch.float32 and max_abs(auto.cpu(), ref) < 0.5 * ref.abs().max().item()


# ---- initialisation from pretrained DINOv2 ------------------------------------------------------


def _native_dinov2_file(tmp_path: Path, embed_dim: int = 96) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm DINOv2 ViT state dict at its NATIVE geometry (patch 14, 518 px -> 37x37 grid)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    native = timm.create_model(
        "vit_base_patch14_dinov2.lvd142m", pretrained=False, num_classes=0,
        embed_dim=embed_dim, depth=2, num_heads=2,
    )
    sd = {k: v.contiguous() for k, v in native.state_dict().items()}
    assert sd["patch_embed.proj.weight"].shape[-1] == 14 and sd["pos_embed"].shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2_native.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_init_encoder_from_local_pretrained_file(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    path, native = _native_dinov2_file(tmp_path)
    model = DMVAE("dmvae-tiny")
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    before = model.encoder.model.patch_embed.proj.weight.detach().clone()
    assert model.init_encoder_from_pretrained(path) is model

    enc = model.encoder.model.state_dict()
    assert enc["patch_embed.proj.weight"].shape == (96, 3, 16, 16)
    assert enc["pos_embed"].shape == (1, 257, 96)
    assert all(torch.isfinite(v).all() for v in enc.values())
    assert not torch.equal(enc["patch_embed.proj.weight"], before)
    # timm's resampling (what the reference gets from pretrained=True, patch_size=16, img_size=256)
    expected_kernel = resample_patch_embed(native["patch_embed.proj.weight"], [16, 16])
    assert torch.allclose(enc["patch_embed.proj.weight"], expected_kernel, atol=1e-6)
    expected_pos = resample_abs_pos_embed(native["pos_embed"], new_size=(16, 16), num_prefix_tokens=1)
    assert torch.allclose(enc["pos_embed"], expected_pos, atol=1e-6)
    # everything else is copied as is; the decoder is untouched
    for k in ("cls_token", "blocks.0.attn.qkv.weight", "blocks.1.ls2.gamma", "norm.weight"):
        assert torch.equal(enc[k], native[k]), k
    assert all(torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())


def test_init_encoder_from_pretrained_errors(tmp_path: Path) -> None:
    model = DMVAE("dmvae-tiny")
    with pytest.raises(FileNotFoundError, match="not found"):
        model.init_encoder_from_pretrained(tmp_path / "missing.safetensors")
    path, _ = _native_dinov2_file(tmp_path, embed_dim=64)  # wrong width for the tiny encoder
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="could not initialise"):
        model.init_encoder_from_pretrained(path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_init_encoder_from_hub_name_offline_without_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    model = DMVAE("dmvae-tiny")
    with pytest.raises(FileNotFoundError, match=r"'vit_base_patch14_dinov2.lvd142m' through timm \(HF_HUB_OFFLINE"):
        model.init_encoder_from_pretrained()


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (torch.zeros(3, SMALL, SMALL), ValueError, r"expected images of shape \(B, 3, H, W\), got a 3-D .*unsqueeze"),
        (torch.zeros(1, 4, SMALL, SMALL), ValueError, r"expected 3 image channels .* got shape \(1, 4, 32, 32\)"),
        (torch.zeros(1, SMALL, SMALL, 3), ValueError, "channels-last"),
        (torch.zeros(1, 3, 40, SMALL), ValueError, r"multiples of the patch size 16, got 40x32"),
        (torch.zeros(1, 3, SMALL, SMALL, dtype=torch.uint8), TypeError, r"floating-point images .* torch.uint8"),
        (torch.full((1, 3, SMALL, SMALL), 200.0), ValueError, r"got values in \[200, 200\].*\[0, 255\]"),
        (torch.full((1, 3, SMALL, SMALL), -1.7), ValueError, r"expected images in \[-1, 1\]"),
        (torch.full((1, 3, SMALL, SMALL), float("nan")), ValueError, "non-finite"),
        (np.zeros((1, 3, SMALL, SMALL), np.float32), TypeError, "got ndarray"),
    ],
)
def test_encode_errors(tiny: DMVAE, bad: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tiny.encode(bad)  # type: ignore[arg-type]


def test_range_check_can_be_disabled(tiny: DMVAE) -> None:
    x = torch.full((1, 3, SMALL, SMALL), 2.0)
    tiny.check_input_range = False
    try:
        assert tiny.encode(x).shape == (1, 8, 2, 2)
    finally:
        tiny.check_input_range = True


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (torch.zeros(1, 4, 2, 2), ValueError, r"expected 8 latent channels .* got shape \(1, 4, 2, 2\)"),
        (torch.zeros(8, 2, 2), ValueError, r"expected latent tokens of shape \(B, N, 8\), got \(8, 2, 2\)"),
        (torch.zeros(1, 5, 8), ValueError, "do not form a square grid"),
        (torch.zeros(2, 1, 8, 2, 2), ValueError, r"5-D tensor"),
        (torch.zeros(1, 8, 2, 2, dtype=torch.int64), TypeError, "floating-point latents"),
        ([0.0], TypeError, "got list"),
    ],
)
def test_decode_errors(tiny: DMVAE, bad: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tiny.decode(bad)  # type: ignore[arg-type]


def test_layout_helper_errors() -> None:
    with pytest.raises(ValueError, match="a 2x3 grid needs 6 tokens, got 5"):
        tokens_to_grid(torch.zeros(1, 5, 4), 2, 3)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        grid_to_tokens(torch.zeros(5, 4))
    t = torch.randn(2, 6, 4)
    assert torch.equal(grid_to_tokens(tokens_to_grid(t, 2, 3)), t)
