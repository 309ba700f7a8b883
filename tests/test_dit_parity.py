"""Parity of LatentDiT with the reference LightningDiT (golden fixtures in shared/fixtures/upstream)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.models import create_model
from dmvae.files import read_torch_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def dit_dir(fixtures_dir):
    return fixtures_dir / "dit"


@pytest.fixture(scope="module")
def config(dit_dir) -> LatentDiTConfig:
    manifest = json.loads((dit_dir / "manifest.json").read_text())
    return LatentDiTConfig.from_dict(manifest["constructor_kwargs"])


@pytest.fixture(scope="module")
def inputs(dit_dir):
    return load_file(dit_dir / "inputs.safetensors")


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_forward_and_cfg_parity(dit_dir, config, inputs, weights, max_abs):
    model = LatentDiT.from_pretrained(dit_dir / "ckpt.pt", config=config, use_ema=weights == "ema")
    assert not model.training
    ref = load_file(dit_dir / f"outputs_{weights}.safetensors")
    x, t, y = inputs["x"], inputs["t"], inputs["y"]
    with torch.no_grad():
        assert max_abs(model(x, t, y), ref["forward"]) <= TOL
        cx, ct, cy = inputs["cfg_x"], inputs["cfg_t"], inputs["cfg_y"]
        assert max_abs(model.forward_with_cfg(cx, ct, cy, 4.0), ref["cfg_standard"]) <= TOL
        legacy = model.forward_with_cfg(cx, ct, cy, 4.0, guidance_channels=3)
        assert max_abs(legacy, ref["cfg_nonstandard"]) <= TOL
        for case in ("lo", "hi", "eq"):
            out = model.forward_with_cfg(cx, inputs[f"cfg_t_{case}"], cy, 4.0, cfg_interval=(0.3, 1.0))
            assert max_abs(out, ref[f"cfg_interval_{case}"]) <= TOL, case
    # the two weight sets really differ, so this test can tell them apart
    other = load_file(dit_dir / f"outputs_{'ema' if weights == 'model' else 'model'}.safetensors")
    assert max_abs(ref["forward"], other["forward"]) > 1e-2


def test_cfg_interval_semantics(dit_dir, config, inputs):
    """t < lo is unguided (both halves = conditional rows), t == lo is guided (strict <)."""
    model = LatentDiT.from_pretrained(dit_dir / "ckpt.pt", config=config)
    cx, cy = inputs["cfg_x"], inputs["cfg_y"]
    with torch.no_grad():
        lo = model.forward_with_cfg(cx, inputs["cfg_t_lo"], cy, 4.0, cfg_interval=(0.3, 1.0))
        cond = model(cx, inputs["cfg_t_lo"], cy)[:2]
        torch.testing.assert_close(lo[:2], cond, rtol=0, atol=0)
        torch.testing.assert_close(lo[2:], cond, rtol=0, atol=0)
        eq = model.forward_with_cfg(cx, inputs["cfg_t_eq"], cy, 4.0, cfg_interval=(0.3, 1.0))
        guided = model.forward_with_cfg(cx, inputs["cfg_t_eq"], cy, 4.0)
        torch.testing.assert_close(eq, guided, rtol=0, atol=0)


def test_fixed_tensors_match_reference(dit_dir, config, max_abs):
    """pos_embed and the RoPE tables we compute equal the ones stored in the reference checkpoint."""
    model = LatentDiT(config)
    ref = read_torch_checkpoint(dit_dir / "ckpt.pt")["ema"]
    sd = model.state_dict()
    for key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        assert max_abs(sd[key], ref[key]) <= 1e-6, key
    assert list(sd) == [k for k in ref if not k.startswith("_")]


@pytest.mark.parametrize("name,manifest", [
    ("LightningDiT-XL/1", "lightningdit_xl1_in32_s16.json"),
    ("LightningDiT-XL/2", "lightningdit_xl2_in32_s16.json"),
])
def test_release_manifest_on_meta_device(fixtures_dir, name, manifest):
    expected = json.loads((fixtures_dir / "manifests" / manifest).read_text())
    with torch.device("meta"):
        model = create_model(name, input_size=16, in_channels=32, num_classes=1000)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(expected.items())
    index = json.loads((fixtures_dir / "manifests" / "index.json").read_text())["files"][manifest]
    assert sum(p.numel() for p in model.parameters()) == index["num_parameters"]
    assert {k for k, _ in model.named_buffers()} == set(index["non_parameter_entries"])


@pytest.mark.slow
def test_forward_and_cfg_parity_compiled(dit_dir, config, inputs, max_abs):
    """The same fixtures with ``LatentDiT.compile()`` (inductor, regional) on: within TOL as well.
    (The whole-model compile traces the same ops; tests/test_compile.py checks it equals eager.)"""
    import torch._dynamo

    torch._dynamo.reset()
    model = LatentDiT.from_pretrained(dit_dir / "ckpt.pt", config=config, use_ema=True).compile()
    ref = load_file(dit_dir / "outputs_ema.safetensors")
    cx, ct, cy = inputs["cfg_x"], inputs["cfg_t"], inputs["cfg_y"]
    try:
        with torch.no_grad():
            assert max_abs(model(inputs["x"], inputs["t"], inputs["y"]), ref["forward"]) <= TOL
            assert max_abs(model.forward_with_cfg(cx, ct, cy, 4.0), ref["cfg_standard"]) <= TOL
            for case in ("lo", "hi", "eq"):
                out = model.forward_with_cfg(cx, inputs[f"cfg_t_{case}"], cy, 4.0, cfg_interval=(0.3, 1.0))
                assert max_abs(out, ref[f"cfg_interval_{case}"]) <= TOL, case
    finally:
        torch._dynamo.reset()
