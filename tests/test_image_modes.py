"""dmvae.image.pil_to_rgb / load_image: every PIL mode decodes to the right 8-bit RGB.

Where a file format can store the mode, the image goes through a real file (PNG / TIFF / JPEG /
GIF / WEBP) and ``load_image``; modes no writer stores (``PA``, ``HSV``, premultiplied) are
decoded in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmvae.image import IMAGE_EXTENSIONS, TRANSPARENCY_BACKGROUND, load_image, pil_to_rgb, pil_to_tensor


def _roundtrip(img: Image.Image, tmp_path: Path, name: str, **save_kw) -> Image.Image:
    path = tmp_path / name
    img.save(path, **save_kw)
    with Image.open(path) as raw:
        stored_mode = raw.mode
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size
    out.info["stored_mode"] = stored_mode
    return out


def _grey(out: Image.Image) -> np.ndarray:
    arr = np.asarray(out)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


RAMP8 = np.arange(256, dtype=np.uint8).reshape(16, 16)


@pytest.mark.parametrize(
    "mode,fmt",
    [("I;16", "png"), ("I;16B", "png"), ("I;16", "tif"), ("I;16B", "tif"), ("I;16L", "tif")],
)
def test_16bit_grey_scales_by_bit_depth(mode: str, fmt: str, tmp_path: Path) -> None:
    values = RAMP8.astype(np.uint16) * 257  # 8-bit value u stored as 16-bit 257 u
    order = ">u2" if mode == "I;16B" else "<u2"
    img = Image.frombytes(mode, (16, 16), values.astype(order).tobytes())
    assert img.mode == mode
    out = _roundtrip(img, tmp_path, f"g16.{fmt}")
    assert out.info["stored_mode"].startswith("I")  # really a 16-bit file, not an 8-bit one
    assert np.array_equal(_grey(out), RAMP8)  # exact: not clipped to white
    mid = pil_to_rgb(Image.fromarray(np.full((2, 2), 32768, np.uint16)))
    assert np.asarray(mid)[0, 0].tolist() == [128, 128, 128]


def test_16bit_png_is_not_all_white_through_pil_to_tensor(tmp_path: Path) -> None:
    values = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "dark16.png")
    x = pil_to_tensor(load_image(tmp_path / "dark16.png"))
    assert x.min() == -1.0 and x.max() == 1.0 and abs(float(x.mean())) < 0.02


def test_mode_I_32bit_int(tmp_path: Path) -> None:
    sixteen = Image.fromarray((RAMP8.astype(np.int32) * 257))
    assert sixteen.mode == "I"
    assert np.array_equal(_grey(_roundtrip(sixteen, tmp_path, "i16.tif")), RAMP8)
    eight = Image.fromarray(RAMP8.astype(np.int32))  # 8-bit values held in an I image: kept
    assert np.array_equal(_grey(_roundtrip(eight, tmp_path, "i8.tif")), RAMP8)
    wide = Image.fromarray(RAMP8.astype(np.int32) * 1000 - 50_000)  # any other range: min-max
    assert np.array_equal(_grey(pil_to_rgb(wide)), RAMP8)


def test_mode_F_float(tmp_path: Path) -> None:
    unit = Image.fromarray(RAMP8.astype(np.float32) / 255.0)
    assert unit.mode == "F"
    assert np.array_equal(_grey(_roundtrip(unit, tmp_path, "f.tif")), RAMP8)
    scaled = Image.fromarray(RAMP8.astype(np.float32))
    assert np.array_equal(_grey(pil_to_rgb(scaled)), RAMP8)
    nan = RAMP8.astype(np.float32) / 255.0
    nan[0, 0] = np.nan
    assert _grey(pil_to_rgb(Image.fromarray(nan)))[0, 0] == 0


def _palette_image() -> Image.Image:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2, 0, 1, 2, 0, 1])
    return img


@pytest.mark.parametrize("name", ["p.png", "p.gif", "p.bmp"])
def test_palette_without_transparency(name: str, tmp_path: Path) -> None:
    out = np.asarray(_roundtrip(_palette_image(), tmp_path, name))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 255, 0]
    assert out[0, 2].tolist() == [0, 0, 255]


@pytest.mark.parametrize("name", ["pt.png", "pt.gif"])
def test_palette_with_transparency_composites_on_white(name: str, tmp_path: Path) -> None:
    img = _palette_image()
    img.info["transparency"] = 2  # the blue index is transparent
    out = np.asarray(_roundtrip(img, tmp_path, name, transparency=2))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 2].tolist() == list(TRANSPARENCY_BACKGROUND)


def test_mode_PA_in_memory() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(0, 0, 255, 255), (0, 0, 255, 0)])
    pa = rgba.convert("PA")
    assert pa.mode == "PA"
    out = np.asarray(pil_to_rgb(pa))
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("name,tol", [("c.tif", 0), ("c.jpg", 6)])
def test_cmyk(name: str, tol: int, tmp_path: Path) -> None:
    img = Image.new("CMYK", (24, 8))
    colours = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]  # white, cyan, black
    for i, c in enumerate(colours):
        img.paste(c, (8 * i, 0, 8 * i + 8, 8))
    out = np.asarray(_roundtrip(img, tmp_path, name, **({"quality": 95} if name.endswith("jpg") else {})))
    for i, want in enumerate([(255, 255, 255), (0, 255, 255), (0, 0, 0)]):
        got = out[4, 8 * i + 4].astype(int)
        assert np.abs(got - np.array(want)).max() <= tol, (i, got, want)


def test_mode_LA_composites_on_white(tmp_path: Path) -> None:
    grey = np.full((1, 3), 40, np.uint8)
    alpha = np.array([[255, 0, 128]], np.uint8)
    la = Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
    out = _grey(_roundtrip(la, tmp_path, "la.png"))
    assert out.tolist() == [[40, 255, round(40 * 128 / 255 + 255 * (1 - 128 / 255))]]


@pytest.mark.parametrize("name", ["l.png", "l.tif", "l.bmp"])
def test_mode_L(name: str, tmp_path: Path) -> None:
    assert np.array_equal(_grey(_roundtrip(Image.fromarray(RAMP8), tmp_path, name)), RAMP8)


def test_mode_L_jpeg(tmp_path: Path) -> None:
    flat = Image.fromarray(np.full((16, 16), 77, np.uint8))
    out = _grey(_roundtrip(flat, tmp_path, "l.jpg", quality=95))
    assert np.abs(out.astype(int) - 77).max() <= 1


@pytest.mark.parametrize("name", ["one.png", "one.tif", "one.bmp"])
def test_mode_1(name: str, tmp_path: Path) -> None:
    bits = np.array([[0, 1, 1, 0]], bool)
    img = Image.fromarray(bits).convert("1")
    assert img.mode == "1"
    assert _grey(_roundtrip(img, tmp_path, name)).tolist() == [[0, 255, 255, 0]]


@pytest.mark.parametrize("name", ["a.png", "a.webp", "a.tif"])
def test_mode_RGBA_composites_on_white(name: str, tmp_path: Path) -> None:
    arr = np.array([[[200, 10, 20, 255], [200, 10, 20, 0], [0, 0, 0, 51]]], np.uint8)
    kw = {"lossless": True} if name.endswith("webp") else {}
    out = np.asarray(_roundtrip(Image.fromarray(arr, mode="RGBA"), tmp_path, name, **kw))
    assert out[0, 0].tolist() == [200, 10, 20]
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent: background, not the stored red
    assert out[0, 2].tolist() == [204, 204, 204]  # 20% black over white


def test_mode_RGB_exact_and_with_trns(tmp_path: Path) -> None:
    arr = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(_roundtrip(Image.fromarray(arr), tmp_path, "rgb.png")), arr)
    arr[0, 0] = (1, 2, 3)
    keyed = _roundtrip(Image.fromarray(arr), tmp_path, "trns.png", transparency=(1, 2, 3))
    assert np.asarray(keyed)[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(np.asarray(keyed)[1:], arr[1:])


def test_rgb_input_is_copied_not_aliased() -> None:
    img = Image.new("RGB", (2, 2), (1, 2, 3))
    out = pil_to_rgb(img)
    out.putpixel((0, 0), (9, 9, 9))
    assert img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("name", ["y.tif", "y.jpg"])
def test_mode_YCbCr(name: str, tmp_path: Path) -> None:
    rgb = Image.new("RGB", (16, 16), (200, 40, 90))
    ycc = rgb.convert("YCbCr")
    out = np.asarray(_roundtrip(ycc, tmp_path, name, **({"quality": 95} if name.endswith("jpg") else {})))
    assert np.abs(out[8, 8].astype(int) - [200, 40, 90]).max() <= 4


def test_mode_LAB_through_tiff(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (4, 4), (255, 255, 255))
    rgb.paste((128, 128, 128), (0, 0, 2, 4))
    lab = rgb.convert("LAB")
    out = np.asarray(_roundtrip(lab, tmp_path, "lab.tif"))
    assert _roundtrip(lab, tmp_path, "lab2.tif").info["stored_mode"] == "LAB"
    assert np.abs(out[0, 0].astype(int) - 128).max() <= 3
    assert np.abs(out[0, 3].astype(int) - 255).max() <= 3


def test_mode_HSV_in_memory() -> None:
    rgb = Image.new("RGB", (2, 2), (200, 40, 90))
    out = np.asarray(pil_to_rgb(rgb.convert("HSV")))
    assert np.abs(out[0, 0].astype(int) - [200, 40, 90]).max() <= 4


def test_premultiplied_modes() -> None:
    straight = Image.fromarray(np.array([[[200, 100, 0, 128], [10, 10, 10, 0]]], np.uint8), mode="RGBA")
    via_premult = pil_to_rgb(straight.convert("RGBa"))
    assert np.abs(np.asarray(via_premult).astype(int) - np.asarray(pil_to_rgb(straight))).max() <= 1
    la = Image.frombytes("La", (1, 1), bytes([50, 128]))  # premultiplied grey 50 at alpha 128
    assert np.asarray(pil_to_rgb(la))[0, 0].tolist() == [50 + 127] * 3


def test_rgbx_and_errors() -> None:
    assert np.asarray(pil_to_rgb(Image.new("RGBX", (1, 1), (5, 6, 7, 0))))[0, 0].tolist() == [5, 6, 7]
    with pytest.raises(TypeError, match="expected a PIL image"):
        pil_to_rgb(np.zeros((2, 2, 3), np.uint8))  # type: ignore[arg-type]


def test_image_extensions_is_the_one_list() -> None:
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"} <= set(IMAGE_EXTENSIONS)
