"""LatentDiT: config, presets, switches, validation, init, hub I/O, checkpointing, torch.compile."""

from __future__ import annotations

import json

import pytest
import torch

from dmvae.dit import LatentDiT, LatentDiTConfig
from dmvae.models import create_model, list_models
from dmvae.files import CheckpointError

TINY = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2,
            num_classes=5)


def tiny(**kw) -> LatentDiT:
    torch.manual_seed(0)
    model = LatentDiT(LatentDiTConfig(**{**TINY, **kw})).eval()
    # adaLN-Zero makes a fresh model output 0: perturb so tests see real signal
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(model: LatentDiT, b: int = 3):
    c = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, c.in_channels, c.input_size, c.input_size, generator=g)
    return x, torch.linspace(0.1, 0.9, b), torch.arange(b) % c.num_classes


# ---- presets -----------------------------------------------------------------------------------


def test_list_models_has_every_reference_size():
    expected = {"Mini/1", "S/1", "B/1", "B/2", "L/1", "L/2", "XL/1", "XL/2", "1p0B/1", "1p0B/2",
                "1p6B/1", "1p6B/2"}
    assert set(list_models("LightningDiT-*")) == {f"LightningDiT-{n}" for n in expected}
    # the "/N" of a name is the preset's patch size (building each one: tests/test_contract.py)
    assert all(f"/{LatentDiTConfig.from_preset(n).patch_size}" in n for n in list_models("LightningDiT-*"))


def test_swiglu_hidden_sizes():
    got = {n: LatentDiTConfig.from_preset(f"LightningDiT-{n}/1").mlp_hidden
           for n in ("XL", "L", "B", "S", "Mini")}
    assert got == {"XL": 3072, "L": 2730, "B": 2048, "S": 1024, "Mini": 682}


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="did you mean 'LightningDiT-XL/1'"):
        create_model("LightningDiT-XXL/1")


def test_overrides_and_config_json_round_trip():
    cfg = LatentDiTConfig.from_preset("LightningDiT-B/2", num_classes=10, in_channels=16)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 768, 12, 2)
    assert LatentDiTConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown"):
        LatentDiTConfig.from_preset("LightningDiT-B/2", hidden=3)


@pytest.mark.parametrize("bad,match", [
    (dict(input_size=5, patch_size=2), "divisible by patch_size"),
    (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(depth=0), "depth"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        LatentDiTConfig(**{**TINY, **bad})


# ---- forward, shapes, switches -------------------------------------------------------------------


@pytest.mark.parametrize("switches", [
    {},
    dict(use_swiglu=False),
    dict(use_rmsnorm=False),
    dict(use_rope=False),
    dict(use_qknorm=False),
    dict(wo_shift=True),
    dict(learn_sigma=True),
    dict(patch_size=2),
])
def test_switches_forward_shapes_and_keys(switches):
    model = tiny(**switches)
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    keys = set(model.state_dict())
    assert ("blocks.0.mlp.fc1.weight" in keys) == (switches.get("use_swiglu") is False)
    assert ("blocks.0.mlp.w12.weight" in keys) != (switches.get("use_swiglu") is False)
    assert ("feat_rope.freqs_cos" in keys) != (switches.get("use_rope") is False)
    assert ("blocks.0.attn.q_norm.weight" in keys) != (switches.get("use_qknorm") is False)
    if switches.get("use_rmsnorm") is False:
        assert "blocks.0.norm1.weight" not in keys  # LayerNorm without affine
        assert "blocks.0.attn.q_norm.bias" in keys  # affine LayerNorm for QK-norm
    mod = model.blocks[0].adaLN_modulation[1].out_features
    assert mod == (4 if switches.get("wo_shift") else 6) * model.config.hidden_size
    lin = model.final_layer.linear.out_features
    assert lin == model.config.patch_size**2 * (2 if switches.get("learn_sigma") else 1) * 4


def test_time_and_label_conditioning_change_output():
    model = tiny()
    x, t, y = inputs(model)
    base = model(x, t, y)
    assert (model(x, t.flip(0), y) - base).abs().max() > 1e-3
    assert (model(x, t, (y + 1) % 5) - base).abs().max() > 1e-3
    # scalar t broadcasts
    torch.testing.assert_close(model(x, 0.3, y), model(x, torch.full((3,), 0.3), y))


def test_batch_rows_are_independent():
    model = tiny()
    x, t, y = inputs(model, b=4)
    full = model(x, t, y)
    torch.testing.assert_close(model(x[1:3], t[1:3], y[1:3]), full[1:3], rtol=1e-5, atol=1e-5)


def test_fresh_model_outputs_zero_adaln_zero():
    model = LatentDiT(LatentDiTConfig(**TINY))
    x, t, y = inputs(model)
    assert model(x, t, y).abs().max() == 0
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()


def test_label_dropout_train_mode_and_force_drop():
    model = tiny(class_dropout_prob=0.5)
    x, t, y = inputs(model, b=64)
    x, t = x[:1].expand(64, -1, -1, -1), torch.full((64,), 0.5)
    y = torch.ones(64, dtype=torch.long)
    null = model(x, t, torch.full_like(y, 5))
    assert torch.equal(model(x, t, y), model(x, t, y))  # eval: deterministic, no dropout
    model.train()
    torch.manual_seed(3)
    out = model(x, t, y)
    dropped = (out - null).flatten(1).abs().max(1).values < 1e-5
    assert 10 < dropped.sum() < 54  # ~half dropped to the null class
    forced = torch.zeros(64, dtype=torch.bool)
    forced[::2] = True
    out = model(x, t, y, force_drop_ids=forced)
    model.eval()
    torch.testing.assert_close(out[::2], null[::2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1::2], model(x, t, y)[1::2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="force_drop_ids"):
        model(x, t, y, force_drop_ids=forced[:3])


@pytest.mark.parametrize("make,match", [
    (lambda x, t, y: (x[:, :3], t, y), "in_channels=4"),
    (lambda x, t, y: (x[:, :, :3, :3], t, y), "input_size=4"),
    (lambda x, t, y: (x[0], t, y), r"\(B, C, H, W\)"),
    (lambda x, t, y: (x, t + 1.0, y), r"\[0, 1\]"),
    (lambda x, t, y: (x, -t, y), r"\[0, 1\]"),
    (lambda x, t, y: (x, t[:2], y), "t must be"),
    (lambda x, t, y: (x, t, y + 10), r"labels must lie in \[0, 5\]"),
    (lambda x, t, y: (x, t, y - 5), r"labels must lie"),
    (lambda x, t, y: (x, t, y.float()), "integer"),
    (lambda x, t, y: (x, t, y[:2]), "y must have shape"),
])
def test_bad_inputs_raise(make, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        model(*make(*inputs(model)))


def test_null_label_allowed_only_with_null_row():
    model = tiny()
    x, t, _ = inputs(model)
    model(x, t, torch.full((3,), 5))  # null class id = num_classes
    no_null = tiny(class_dropout_prob=0.0)
    assert no_null.y_embedder.embedding_table.num_embeddings == 5 and no_null.null_class is None
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        no_null(x, t, torch.full((3,), 5))


def test_unconditional_model_num_classes_zero(tmp_path):
    model = tiny(num_classes=0)
    assert model.y_embedder is None and model.null_class is None and model.num_classes == 0
    assert not any(k.startswith("y_embedder") for k in model.state_dict())
    x, t, _ = inputs(tiny())
    out = model(x, t)  # no labels
    assert out.shape == x.shape and torch.equal(out, model(x, t, None))
    assert not torch.equal(out, model(x, t.flip(0)))  # t still conditions it
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=0\): pass y=None"):
        model(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="null class"):
        model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), None, 2.0)
    model.save_pretrained(tmp_path / "u")
    again = LatentDiT.from_pretrained(tmp_path / "u")
    assert again.config.num_classes == 0 and torch.equal(again.eval()(x, t), out)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        LatentDiTConfig(**{**TINY, "num_classes": -1})


def test_conditional_model_requires_labels():
    model = tiny()
    x, t, _ = inputs(model)
    with pytest.raises(ValueError, match=r"y is required.*5 classes, null class 5"):
        model(x, t)


def test_check_values_false_skips_only_value_checks():
    model = tiny()
    x, t, y = inputs(model)
    torch.testing.assert_close(model(x, t, y, check_values=False), model(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="in_channels=4"):  # shapes are always checked
        model(x[:, :3], t, y, check_values=False)


def test_forward_with_cfg_scale_one_and_odd_batch():
    model = tiny()
    x, t, y = inputs(model, b=2)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, 5)])
    out = model.forward_with_cfg(xx, tt, yy, 1.0)
    torch.testing.assert_close(out[:2], model(x, t, y), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        model.forward_with_cfg(xx[:3], tt[:3], yy[:3], 2.0)


# ---- compile, checkpointing -------------------------------------------------------------------------


@pytest.mark.slow  # torch.compile
def test_block_compiles_without_graph_breaks():
    model = tiny()
    block = model.blocks[0]
    x = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, c, model.feat_rope), block(x, c, model.feat_rope))
    explained = torch._dynamo.explain(block)(x, c, model.feat_rope)
    assert explained.graph_break_count == 0


def test_gradient_checkpointing_same_gradients():
    model = tiny(class_dropout_prob=0.0)
    x, t, y = inputs(model)
    model.train()
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(enabled)
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert LatentDiT(LatentDiTConfig(**TINY, use_checkpoint=True)).gradient_checkpointing


# ---- hub I/O ------------------------------------------------------------------------------------


def test_from_pretrained_reference_pt(tmp_path, fixtures_dir):
    kwargs = json.loads((fixtures_dir / "dit" / "manifest.json").read_text())["constructor_kwargs"]
    ckpt = torch.load(fixtures_dir / "dit" / "ckpt.pt", weights_only=True)
    ema = LatentDiT.from_pretrained(fixtures_dir / "dit" / "ckpt.pt", config=kwargs)
    raw = LatentDiT.from_pretrained(fixtures_dir / "dit" / "ckpt.pt", config=kwargs, use_ema=False)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(ema.state_dict()[key], ckpt["ema"][key])
    assert torch.equal(raw.state_dict()[key], ckpt["model"][key])
    # a bare state dict and a directory in the release layout (ep800.pt) load too
    torch.save(ckpt["ema"], tmp_path / "bare.pt")
    bare = LatentDiT.from_pretrained(tmp_path / "bare.pt", config=kwargs)
    assert torch.equal(bare.state_dict()[key], ckpt["ema"][key])
    (tmp_path / "release").mkdir()
    torch.save({"model": ckpt["model"], "ema": ckpt["ema"]}, tmp_path / "release" / "ep800.pt")
    rel = LatentDiT.from_pretrained(tmp_path / "release", config=kwargs)
    assert torch.equal(rel.state_dict()[key], ckpt["ema"][key])


def test_from_pretrained_errors(tmp_path, fixtures_dir):
    kwargs = json.loads((fixtures_dir / "dit" / "manifest.json").read_text())["constructor_kwargs"]
    ckpt = torch.load(fixtures_dir / "dit" / "ckpt.pt", weights_only=True)
    with pytest.raises(ValueError, match="config"):
        LatentDiT.from_pretrained(fixtures_dir / "dit" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="shape"):
        LatentDiT.from_pretrained(fixtures_dir / "dit" / "ckpt.pt", config={**kwargs, "hidden_size": 32})
    torch.save({"model": ckpt["model"]}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="'ema'"):
        LatentDiT.from_pretrained(tmp_path / "no_ema.pt", config=kwargs)
    # a failed load leaves the model untouched
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(ckpt["ema"])
    with pytest.raises(CheckpointError):
        model.load_weights(bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
