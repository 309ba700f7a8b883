"""DMVAE / LatentDiT loading and input edge cases (issue 11 items 3, 4, 10; issue 12 items 1, 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dmvae import DMVAE, LatentDiT
from dmvae.files import CheckpointError
from dmvae.tiling import tiled_decode

SMALL = 32
DIT_CFG = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)


@pytest.fixture(scope="module")
def tiny() -> DMVAE:
    torch.manual_seed(0)
    return DMVAE("dmvae-tiny").eval()


@pytest.fixture(scope="module")
def saved(tiny: DMVAE, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_pretrained(tmp_path_factory.mktemp("vae") / "tiny")


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- inputs ----------------------------------------------------------------------------------


def test_empty_batches_encode_and_decode_consistently(tiny: DMVAE) -> None:
    z = tiny.encode(torch.zeros(0, 3, SMALL, SMALL))
    assert z.shape == (0, 8, 2, 2) and z.dtype == torch.float32
    assert tiny.decode(z).shape == (0, 3, SMALL, SMALL)
    assert tiny.encode_features(torch.zeros(0, 3, SMALL, SMALL)).shape == (0, 4, 96)
    out = tiny(torch.zeros(0, 3, SMALL, SMALL))
    assert out.reconstruction.shape == (0, 3, SMALL, SMALL)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (torch.zeros(1, 3, 0, 0), ValueError, r"0x0 pixels are smaller than one patch \(16x16\)"),
        (torch.zeros(1, 3, 16, 0), ValueError, "smaller than one patch"),
        (torch.zeros(1, 3, 32, 32, device="meta"), ValueError, "images are on the meta device"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.complex64), TypeError, "real-valued images"),
    ],
)
def test_encode_bad_inputs(tiny: DMVAE, bad: torch.Tensor, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tiny.encode(bad)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (torch.zeros(1, 8, 0, 0), ValueError, r"latent grid of at least 1x1, got shape \(1, 8, 0, 0\)"),
        (torch.zeros(1, 0, 8), ValueError, "at least one latent token"),
        (torch.zeros(1, 8, 2, 2, device="meta"), ValueError, "latents are on the meta device"),
    ],
)
def test_decode_bad_inputs(tiny: DMVAE, bad: torch.Tensor, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tiny.decode(bad)


def test_reconstruct_accepts_paths_pil_and_tensors(tiny: DMVAE, tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((40, 30))
    img.save(tmp_path / "a.png")
    from_pil = tiny.reconstruct(img)
    from_path = tiny.reconstruct(tmp_path / "a.png")
    from_str = tiny.reconstruct([str(tmp_path / "a.png"), img])
    assert len(from_pil) == 1 and from_pil[0].size == (256, 256)
    import numpy as np

    ref = np.asarray(from_pil[0], dtype=np.int16)
    assert np.array_equal(np.asarray(from_path[0], dtype=np.int16), ref)
    assert len(from_str) == 2  # a batch of 2: float rounding may move a pixel by one level
    assert np.abs(np.asarray(from_str[0], dtype=np.int16) - ref).max() <= 1
    x = torch.rand(2, 3, SMALL, SMALL) * 2 - 1
    out = tiny.reconstruct(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.allclose(out, tiny.decode(tiny.encode(x)), atol=1e-6)
    assert tiny.reconstruct(x[0], output_type="pil")[0].size == (SMALL, SMALL)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tiny.reconstruct(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="output_type"):
        tiny.reconstruct(x, output_type="np")


# ---- tiling ----------------------------------------------------------------------------------


def test_tiled_decode_blending_is_exact_for_a_local_decoder() -> None:
    """With a decoder whose output pixel depends only on its own latent, the overlapping tiles
    agree and the blend must reproduce the whole decode (the geometry and weights are right)."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 11, 7)
    w = torch.randn(3, 4)

    def local(c: torch.Tensor) -> torch.Tensor:  # 1x1 "conv" then 4x nearest upsampling
        return torch.einsum("oc,bchw->bohw", w, c).repeat_interleave(4, -2).repeat_interleave(4, -1)

    whole = local(z)
    for tile, overlap, context in [(4, 1, 0), (3, 2, 1), (5, 0, 2), (11, 3, 0)]:
        tiled = tiled_decode(local, z, tile=tile, overlap=overlap, scale=4, context=context)
        assert (tiled - whole).abs().max() < 1e-5, (tile, overlap, context)


def test_enable_tiling_matches_whole_decode_on_a_photo(tiny: DMVAE) -> None:
    """Tiny random-weight model, 256x256 photo = 16x16 latents, 8-latent tiles, overlap 4,
    context 4. A random decoder is far less local than a trained one (GroupNorm statistics of a
    tile differ from the image's), so the stated tolerance is loose: mean |diff| <= 0.1 and
    max |diff| <= 1.5 on the [-1, 1] scale (measured: 0.043 / 1.03); a tile covering the grid is
    bit-identical."""
    from PIL import Image
    from skimage import data

    from dmvae.image import pil_to_tensor

    x = pil_to_tensor(Image.fromarray(data.astronaut()), size=256)
    with torch.no_grad():
        z = tiny.encode(x)
        whole = tiny.decode(z)
        try:
            tiny.enable_tiling(16)
            assert torch.equal(tiny.decode(z), whole)
            tiny.enable_tiling(8, overlap=4, context=4)
            tiled = tiny.decode(z)
        finally:
            tiny.disable_tiling()
    diff = (tiled - whole).abs()
    assert diff.mean() <= 0.1 and diff.max() <= 1.5, (diff.mean().item(), diff.max().item())
    with pytest.raises(ValueError, match="overlap"):
        tiny.enable_tiling(4, overlap=4)
    assert tiny.tiling is None


# ---- diffusers-style names -------------------------------------------------------------------


def test_num_parameters_and_torch_dtype(tiny: DMVAE, saved: Path) -> None:
    assert tiny.num_parameters() == tiny.parameter_counts()["total"]
    m = DMVAE.from_pretrained(saved, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    m.freeze_encoder()
    assert m.num_parameters(only_trainable=True) == m.num_parameters() - m.parameter_counts()["encoder"]
    with pytest.raises(ValueError, match="disagree"):
        DMVAE.from_pretrained(saved, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        DMVAE.from_pretrained(saved, dtype=torch.int32)


# ---- config.json -----------------------------------------------------------------------------


def test_config_is_tagged_with_its_class_and_other_tags_are_refused(saved: Path, tmp_path: Path) -> None:
    data = json.loads((saved / "config.json").read_text())
    assert data["_class_name"] == "DMVAEConfig"  # written by DMVAEConfig.to_json
    other = _copy_dir(saved, tmp_path / "other")
    (other / "config.json").write_text(json.dumps({**data, "_class_name": "UNetConfig"}))
    with pytest.raises(ValueError, match=r"describes a 'UNetConfig', not a DMVAE"):
        DMVAE.from_pretrained(other)


def test_loading_the_other_model_kind_says_what_it_is(saved: Path, tmp_path: Path) -> None:
    dit_dir = LatentDiT(DIT_CFG).save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"describes a LatentDiT, not a DMVAE: load it with dmvae.LatentDiT"):
        DMVAE.from_pretrained(dit_dir)
    with pytest.raises(ValueError, match=r"describes a DMVAE, not a LatentDiT"):
        LatentDiT.from_pretrained(saved)


def test_missing_latent_statistics_are_refused_not_defaulted(saved: Path, tmp_path: Path) -> None:
    d = _copy_dir(saved, tmp_path / "nostats")
    data = json.loads((d / "config.json").read_text())
    data.update(latent_mean=0.25, latent_scale=0.5)
    stats = {k: data.pop(k) for k in ("latent_mean", "latent_scale")}
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json does not state latent_mean, latent_scale"):
        DMVAE.from_pretrained(d)
    # the explicit choice loads
    m = DMVAE.from_pretrained(d, config={**data, **stats})
    assert (m.config.latent_mean, m.config.latent_scale) == (0.25, 0.5)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("decoder_channels", "32", r"DMVAEConfig.decoder_channels: expected an int, got str '32'"),
        ("decoder_channel_mult", [1, "2", 2, 2], r"DMVAEConfig.decoder_channel_mult\[1\]: expected an int"),
        ("latent_scale", None, r"DMVAEConfig.latent_scale: expected a number, got NoneType"),
    ],
)
def test_wrongly_typed_config_fields_name_file_and_field(
    saved: Path, tmp_path: Path, field: str, value: object, match: str
) -> None:
    d = _copy_dir(saved, tmp_path / "bad")
    data = json.loads((d / "config.json").read_text())
    data[field] = value
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: " + match):
        DMVAE.from_pretrained(d)


def test_dit_depth_as_string_and_invalid_json(tmp_path: Path) -> None:
    d = LatentDiT(DIT_CFG).save_pretrained(tmp_path / "dit")
    data = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**data, "depth": "2"}))
    with pytest.raises(ValueError, match=r"dit/config.json: LatentDiTConfig.depth: expected an int, got str '2'"):
        LatentDiT.from_pretrained(d)
    (d / "config.json").write_text('{"input_size": 4, "depth": 1,, "x": 2}')
    with pytest.raises(ValueError, match=r"config.json \(LatentDiT config\) is not valid JSON.*'depth'"):
        LatentDiT.from_pretrained(d)


# ---- weights -----------------------------------------------------------------------------------


def _tiny_dit_file(tmp_path: Path, **replace: torch.Tensor) -> tuple[LatentDiT, Path]:
    torch.manual_seed(0)
    model = LatentDiT(DIT_CFG)
    d = model.save_pretrained(tmp_path / "w")
    sd = {**{k: v.contiguous() for k, v in model.state_dict().items()}, **replace}
    save_file(sd, str(d / "model.safetensors"))
    return model, d


def test_integer_weights_are_refused_by_from_pretrained_and_load_weights(tmp_path: Path) -> None:
    model, d = _tiny_dit_file(tmp_path)
    key = "x_embedder.proj.weight"
    ints = model.state_dict()[key].round().to(torch.int32).contiguous()
    save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, key: ints}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{key} has dtype torch.int32; expected floating-point"):
        LatentDiT.from_pretrained(d)
    target = LatentDiT(DIT_CFG)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=rf"{key} has dtype torch.int32"):
        target.load_weights(d)
    assert _unchanged(target, before)


def test_load_weights_with_one_meta_or_complex_tensor_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = LatentDiT(DIT_CFG)
    target = LatentDiT(DIT_CFG)
    before = _snapshot(target)
    sd = dict(src.state_dict())
    last = list(sd)[-1]
    for bad, match in [(torch.empty_like(sd[last], device="meta"), "meta device"),
                       (sd[last].to(torch.complex64), "is complex")]:
        with pytest.raises(CheckpointError, match=rf"{last} .*{match}"):
            target.load_weights({**sd, last: bad})
        assert _unchanged(target, before)
    with pytest.raises(CheckpointError, match="is complex"):
        LatentDiT._build_and_load(src.config, {**sd, last: sd[last].to(torch.complex64)}, "x")
