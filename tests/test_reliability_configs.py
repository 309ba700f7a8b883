"""Issue 20: configs checked before they build, numeric knobs checked, inputs that metrics could
misread refused, and tar-shard loaders that end on empty input.

Invariants:

* loading a model never builds (even on the meta device) much more than its weights hold: an
  oversized ``config.json`` (depth, width) is refused after a bounded number of modules;
* a model built without weights is refused above a stated parameter / module count;
* every public numeric knob of the samplers and metrics refuses NaN, infinities and non-numbers,
  naming the argument;
* LPIPS never reads integer images as [-1, 1];
* a shard loader over empty shards raises instead of spinning.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as module_hooks

from dmvae.checks import check_finite, check_int, check_range
from dmvae.dit import LatentDiT
from dmvae.files import CheckpointError
from dmvae.hub import MAX_MODULES, ConfigTooLargeError, check_config_size

DIT = "LightningDiT-Mini/1"


def _count_modules(fn) -> tuple[int, BaseException | None]:
    """Run ``fn``; how many modules were registered meanwhile, and what it raised."""
    n = {"modules": 0}

    def hook(*_):
        n["modules"] += 1

    h = module_hooks.register_module_module_registration_hook(hook)
    try:
        fn()
        err = None
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        err = e
    finally:
        h.remove()
    return n["modules"], err


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dit")
    LatentDiT(LatentDiT.config_class.from_preset(DIT)).save_pretrained(d)
    return d


@pytest.mark.parametrize(("field", "factor"), [("depth", 4), ("depth", 1000), ("depth", 10**6),
                                               ("hidden_size", 8), ("hidden_size", 10**5)])
def test_an_oversized_config_json_is_refused_after_a_bounded_build(dit_dir: Path, tmp_path: Path,
                                                                   field: str, factor: int) -> None:
    cfg = json.loads((dit_dir / "config.json").read_text())
    if field == "hidden_size":
        cfg["num_heads"] = 1
    normal, _ = _count_modules(lambda: LatentDiT.from_pretrained(dit_dir))
    cfg[field] = cfg[field] * factor
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((dit_dir / "model.safetensors").read_bytes())
    built, err = _count_modules(lambda: LatentDiT.from_pretrained(bad))
    assert isinstance(err, CheckpointError), err  # ConfigTooLargeError or the key / shape report
    assert "model.safetensors" in str(err)
    assert built <= 6 * normal + 2000, (built, normal)  # bounded by the weights, not by the config


@pytest.mark.parametrize(("field", "factor"), [("decoder_num_res_blocks", 1000), ("decoder_channels", 100),
                                               ("z_channels", 10**4)])
def test_an_oversized_autoencoder_config_is_refused_after_a_bounded_build(tmp_path: Path, field: str,
                                                                          factor: int) -> None:
    from dmvae.autoencoder import DMVAE, DMVAEConfig

    DMVAE(DMVAEConfig.from_preset("dmvae-tiny", image_size=32)).save_pretrained(tmp_path)
    normal, _ = _count_modules(lambda: DMVAE.from_pretrained(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] *= factor
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    built, err = _count_modules(lambda: DMVAE.from_pretrained(tmp_path))
    assert isinstance(err, ValueError) and "model.safetensors" in str(err), err
    assert built <= 6 * normal + 2000, (built, normal)


def _preset(**overrides):
    cfg = LatentDiT.config_class.from_preset(DIT)
    return cfg.replace(**overrides) if overrides else cfg


def test_a_build_without_weights_is_refused_above_the_stated_limit() -> None:
    built, err = _count_modules(lambda: check_config_size(LatentDiT, _preset(depth=10**7), max_modules=500))
    assert isinstance(err, ConfigTooLargeError) and "more than 500 modules" in str(err)
    assert built <= 510
    with pytest.raises(ConfigTooLargeError, match="max_parameters"):
        check_config_size(LatentDiT, _preset(hidden_size=2**20, num_heads=1))  # one Linear is 2**40 values
    n = check_config_size(LatentDiT, _preset())
    assert n == LatentDiT(_preset()).num_parameters()
    with pytest.raises(ConfigTooLargeError, match=f"more than {n - 1:,} parameters"):
        check_config_size(LatentDiT, _preset(), max_parameters=n - 1)


@pytest.mark.slow
def test_from_config_stops_a_huge_depth_at_the_default_module_limit() -> None:
    if not hasattr(LatentDiT, "from_config"):
        pytest.skip("HubMixin.from_config is not in this tree")
    built, err = _count_modules(lambda: LatentDiT.from_config(DIT, depth=10**7))
    assert isinstance(err, ConfigTooLargeError) and "modules" in str(err)
    assert built <= MAX_MODULES + 10


# ------------------------------------------------------------------ numeric knobs

BAD_NUMBERS = [math.nan, math.inf, -math.inf, "1.5", None, True, torch.tensor([1.0, 2.0])]


@pytest.mark.parametrize("bad", BAD_NUMBERS, ids=repr)
def test_check_finite_refuses_what_is_not_a_finite_number(bad) -> None:
    with pytest.raises((TypeError, ValueError), match="knob"):
        check_finite("knob", bad)


def test_checks_accept_numbers_and_ranges() -> None:
    assert check_finite("a", torch.tensor(2.5)) == 2.5 and check_finite("a", 3) == 3.0
    assert check_range("a", 0.5, 0, 1, low_open=True) == 0.5
    with pytest.raises(ValueError, match=r"a must be in \(0, 1\], got 0"):
        check_range("a", 0, 0, 1, low_open=True)
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", 2.0)


SAMPLER_KNOBS = {"cfg_scale": 1.5, "time_shift": 1.0, "last_step_size": 0.04, "atol": 1e-6, "rtol": 1e-3}


@pytest.mark.parametrize("knob", [*SAMPLER_KNOBS, "cfg_interval"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
def test_every_sampler_knob_refuses_non_finite_values_by_name(knob: str, bad: float) -> None:
    from dmvae.samplers import sample

    def model(x, t, y=None, **kw):
        return -x

    value = (0.0, bad) if knob == "cfg_interval" else bad
    with pytest.raises(ValueError, match=knob.replace("cfg_interval", r"cfg_interval\[1\]")):
        sample(model, torch.randn(2, 3, 4, 4), None, num_steps=2, **{knob: value})


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=repr)
def test_metric_knobs_refuse_non_finite_values_by_name(bad: float) -> None:
    from dmvae.metrics.distribution import rbf_mmd, sliced_wasserstein
    from dmvae.metrics.precision_recall import precision_recall

    x, y = torch.randn(20, 3), torch.randn(20, 3)
    with pytest.raises(ValueError, match="bandwidth"):
        rbf_mmd(x, y, bandwidth=bad)
    with pytest.raises(ValueError, match="bandwidth\\[1\\]"):
        rbf_mmd(x, y, bandwidth=[1.0, bad])
    with pytest.raises(ValueError, match="p must be"):
        sliced_wasserstein(x, y, p=bad)
    with pytest.raises(TypeError, match="k must be an int"):
        precision_recall(x, y, k=True)
    nan_x = x.clone()
    nan_x[3, 1] = bad
    with pytest.raises(ValueError, match="x holds NaN or infinite"):
        rbf_mmd(nan_x, y, bandwidth=1.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_lpips_refuses_integer_images(dtype: torch.dtype) -> None:
    from dmvae.lpips import LPIPS

    lp = LPIPS(pretrained=False)
    x = torch.randint(0, 2 if dtype == torch.bool else 255, (1, 3, 16, 16)).to(dtype)
    with pytest.raises(TypeError, match="uint8_to_float"):
        lp(x, x)
    lp(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


def test_psnr_refuses_float_images_in_0_255() -> None:
    from dmvae.metrics.image import psnr, ssim

    x = torch.rand(1, 3, 16, 16) * 255
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="pass \\[0, 255\\] images as uint8"):
            metric(x, x)
    assert torch.isfinite(psnr(x.round().to(torch.uint8), (x * 0.9).round().to(torch.uint8))).all()


# ------------------------------------------------------------------ shard loaders end


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["all-empty", "one-empty", "missing", "no-image", "no-label", "bad-label",
                                    "bad-image"])
def test_shard_loader_over_bad_shards_ends_with_an_error_naming_them(tmp_path: Path, layout: str) -> None:
    pytest.importorskip("webdataset")
    from dmvae.training.data import train_transform
    from dmvae.training.webdataset import ShardLoader

    good = {"a.png": _png(), "a.cls": b"1"}
    shards = {
        "all-empty": [{}, {}],
        "one-empty": [good, {}],
        "missing": [good, None],
        "no-image": [{"a.txt": b"x", "a.cls": b"1"}],
        "no-label": [{"a.png": _png()}],
        "bad-label": [{"a.png": _png(), "a.cls": b"cat"}],
        "bad-image": [{"a.png": _png()[:30], "a.cls": b"1"}],
    }[layout]
    paths = []
    for i, members in enumerate(shards):
        p = tmp_path / f"s{i}.tar"
        if members is not None:
            _tar(p, members)
        paths.append(str(p))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        loader = ShardLoader(paths, train_transform(16), 1, num_classes=2)
        next(loader)
    assert "s0.tar" in str(e.value) or "s1.tar" in str(e.value), e.value


def test_the_stream_guard_stops_on_shards_that_yield_nothing(tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    from dmvae.training.webdataset import _SamplesOrFail

    empty = _tar(tmp_path / "empty.tar", {})
    endless = ({"url": str(empty)} for _ in range(10**9))  # what a resampled shard list yields
    with pytest.raises(ValueError, match="7 tar shards in a row held no sample.*empty.tar"):
        list(_SamplesOrFail(7)(endless))
