"""dmvae.image: loading, ADM centre crop, tensor <-> PIL/numpy conventions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmvae.image import center_crop_arr, decode_image, load_image, pil_to_tensor, tensor_to_pil, to_uint8_numpy


def _rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def test_load_image(tmp_path: Path) -> None:
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    gray.save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (8, 8)
    assert np.array_equal(np.asarray(img)[..., 0], np.asarray(gray))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="got a URL"):
        load_image("https://example.com/cat.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not read"):
        load_image(tmp_path / "bad.png")


def test_decode_image_from_bytes_names_the_source() -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6), 7, dtype=np.uint8), mode="L").save(buf, format="PNG")
    img = decode_image(io.BytesIO(buf.getvalue()), "shard-0.tar:000001")
    assert img.mode == "RGB" and img.size == (6, 4) and np.asarray(img).max() == 7
    with pytest.raises(ValueError, match="could not read shard-0.tar:000002 as an image"):
        decode_image(io.BytesIO(b"not an image"), "shard-0.tar:000002")


@pytest.mark.parametrize("w,h", [(300, 451), (1024, 700), (256, 256), (100, 80)])
def test_center_crop_size(w: int, h: int) -> None:
    out = center_crop_arr(_rgb(h, w), 256)
    assert out.size == (256, 256) and out.mode == "RGB"


def test_center_crop_exact_size_is_a_pure_crop() -> None:
    img = _rgb(256, 300)  # short side already 256: no resampling, only the centre crop
    out = np.asarray(center_crop_arr(img, 256))
    assert np.array_equal(out, np.asarray(img)[:, 22:278])


def test_center_crop_keeps_the_centre_and_box_downsamples() -> None:
    # left half black, right half white, 1024x512 -> short side 512 >= 2*256 -> one BOX halving
    arr = np.zeros((512, 1024, 3), np.uint8)
    arr[:, 512:] = 255
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 256))
    # after halving (512x256) the centre 256 columns straddle the edge at column 128
    assert (out[:, :127] == 0).all() and (out[:, 129:] == 255).all()
    const = center_crop_arr(Image.new("RGB", (900, 700), (10, 200, 30)), 64)
    assert (np.asarray(const) == (10, 200, 30)).all()


def test_pil_to_tensor_values_and_shapes() -> None:
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = 255
    arr[1, 2] = (0, 128, 255)
    x = pil_to_tensor(Image.fromarray(arr))
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert x[0, :, 0, 1].tolist() == [-1.0, -1.0, -1.0]
    assert torch.allclose(x[0, :, 1, 2], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    batch = pil_to_tensor([arr, Image.fromarray(arr).convert("L")])  # numpy + grayscale PIL
    assert batch.shape == (2, 3, 2, 3)
    assert pil_to_tensor(np.stack([arr, arr])).shape == (2, 3, 2, 3)
    assert pil_to_tensor([_rgb(40, 50), _rgb(60, 30)], size=16).shape == (2, 3, 16, 16)


def test_pil_to_tensor_errors() -> None:
    with pytest.raises(ValueError, match=r"different sizes .* pass size="):
        pil_to_tensor([_rgb(8, 8), _rgb(8, 9)])
    with pytest.raises(TypeError, match="uint8 arrays of shape"):
        pil_to_tensor(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="non-empty sequence"):
        pil_to_tensor([])
    with pytest.raises(TypeError, match="expected PIL images"):
        pil_to_tensor(["a.png"])  # type: ignore[list-item]


def test_uint8_round_trip_is_identity() -> None:
    values = np.arange(256, dtype=np.uint8)
    arr = np.stack([values.reshape(16, 16)] * 3, axis=-1)  # every uint8 value once per channel
    x = pil_to_tensor(arr)
    assert np.array_equal(to_uint8_numpy(x)[0], arr)
    assert np.array_equal(np.asarray(tensor_to_pil(x)[0]), arr)


def test_uint8_rounding_and_saturation() -> None:
    # trunc(clamp(127.5 x + 128)): 127.5 x + 128 = 100.7 -> 100, = 100.2 -> 100, = 101.0 -> 101
    xs = torch.tensor([(100.7 - 128) / 127.5, (100.2 - 128) / 127.5, (101.0 - 128) / 127.5, -3.0, 4.0])
    x = xs.view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8_numpy(x)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [100, 100, 101, 0, 255]
    single = tensor_to_pil(torch.zeros(3, 4, 5))
    assert len(single) == 1 and single[0].size == (5, 4)
    assert (np.asarray(single[0]) == 128).all()


def test_to_uint8_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_uint8_numpy(torch.zeros(1, 4, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        to_uint8_numpy(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_numpy(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        to_uint8_numpy(np.zeros((1, 3, 2, 2)))  # type: ignore[arg-type]


def test_list_images_and_class_labels(tmp_path: Path) -> None:
    from dmvae.image import folder_class_labels, list_images

    for rel in ("b/2.png", "a/1.JPEG", "a/0.webp", "b/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("x")
        else:
            _rgb(4, 4).save(tmp_path / rel, format="PNG")
    files = list_images(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/0.webp", "a/1.JPEG", "b/2.png"]
    assert folder_class_labels(tmp_path, files) == ([0, 0, 1], ["a", "b"])
    _rgb(4, 4).save(tmp_path / "top.png")
    assert folder_class_labels(tmp_path, list_images(tmp_path)) is None  # not a class-folder layout
    assert [f.name for f in list_images(tmp_path, num=2)] == ["0.webp", "2.png"]
    with pytest.raises(ValueError, match="holds only 4"):
        list_images(tmp_path, num=5)
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path / "empty"


def test_make_grid_and_save_image_grid(tmp_path: Path) -> None:
    from dmvae.image import make_grid, save_image_grid

    imgs = np.stack([np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30)])  # (3, H=2, W=3, 3)
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 3)
    assert (grid[1:3, 1:4] == 10).all() and (grid[1:3, 5:8] == 20).all() and (grid[4:6, 1:4] == 30).all()
    assert (grid[4:6, 5:8] == 0).all() and (grid[0] == 0).all()  # empty tile and borders stay black
    t = torch.zeros(3, 3, 2, 3)  # float [-1, 1] tensors are converted like every image
    assert make_grid(t, nrow=2, padding=1)[1, 1, 0] == 128
    path = save_image_grid(imgs, tmp_path / "g.png", nrow=2, padding=1)
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_image_grid(imgs, path, overwrite=False)
    with pytest.raises(ValueError, match="format"):
        save_image_grid(imgs, tmp_path / "g.unknown")
    with pytest.raises(ValueError, match="uint8 images"):
        make_grid(np.zeros((0, 2, 2, 3), np.uint8))


def test_one_float_to_uint8() -> None:
    from dmvae.image import to_uint8
    from dmvae.metrics import image as metric_image

    assert metric_image.to_uint8 is to_uint8  # one implementation
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]
    assert np.array_equal(to_uint8(x).permute(0, 2, 3, 1).numpy(), to_uint8_numpy(x))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 3, 2, 2), float("nan")))


def test_save_image_is_atomic_and_takes_the_format_from_the_suffix(tmp_path) -> None:
    from dmvae.image import save_image

    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    png = save_image(arr, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(png)), arr)
    save_image(Image.fromarray(arr), tmp_path / "a.jpg")
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"
    with pytest.raises(FileExistsError, match="a.png exists"):
        save_image(arr, png, overwrite=False)
    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_image(arr, tmp_path / "a.unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.png"]  # no temporary left


def test_the_one_adm_crop_reads_any_mode() -> None:
    from dmvae.image import pil_to_rgb

    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 70, 4), dtype=np.uint8), "RGBA")
    assert np.array_equal(np.asarray(center_crop_arr(rgba, 32)), np.asarray(center_crop_arr(pil_to_rgb(rgba), 32)))
    assert center_crop_arr(rgba.convert("L"), 32).mode == "RGB"
