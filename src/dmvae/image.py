"""PIL / numpy <-> tensor helpers with the conventions of DMVAE and ADM.

- Model images are float (B, 3, H, W) in [-1, 1]: ``x = uint8 / 127.5 - 1``.
- Back to 8 bits as the reference (and ADM / DiT sampling scripts) do:
  ``uint8 = trunc(clamp(127.5 * x + 128, 0, 255))``, i.e. ``127.5 x + 127.5`` rounded half-up,
  so ``uint8 -> x -> uint8`` is the identity.
- :func:`center_crop_arr` is ADM's (guided-diffusion) ImageNet preprocessing, which the
  reference's training/evaluation data pipeline uses.
- :func:`pil_to_rgb` is the one decoder of every PIL mode to 8-bit RGB (used by
  :func:`load_image`, the evaluation folders and the training data pipeline), and
  :data:`IMAGE_EXTENSIONS` the one list of file suffixes treated as images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Union

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "TRANSPARENCY_BACKGROUND",
    "center_crop_arr",
    "decode_image",
    "folder_class_labels",
    "list_images",
    "load_image",
    "make_grid",
    "pil_to_rgb",
    "pil_to_tensor",
    "resize_center_crop",
    "save_image",
    "save_image_grid",
    "tensor_to_pil",
    "to_uint8",
    "to_uint8_numpy",
]

ImageLike = Union[Image.Image, np.ndarray]

#: File suffixes (lower case) treated as images by every folder listing in dmvae.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

#: Background that transparent pixels are composited on (white, as browsers and most tools show).
TRANSPARENCY_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


def _rescale_to_uint8(arr: np.ndarray, scale_max: float) -> np.ndarray:
    """``round(clip(arr, 0, scale_max) * 255 / scale_max)`` as uint8 (NaN -> 0)."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=scale_max, neginf=0.0)
    return np.rint(np.clip(arr, 0.0, scale_max) * (255.0 / scale_max)).astype(np.uint8)


def _grey_to_uint8(img: Image.Image) -> np.ndarray:
    """High-bit-depth single-channel modes -> uint8 (H, W), scaled by their bit depth.

    - ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N``: 16-bit, ``v * 255 / 65535`` (so ``v = 257 u``
      maps back to ``u`` exactly).
    - ``I`` (32-bit signed int; what several decoders give for 16-bit files): values in [0, 255]
      are 8-bit values (kept), values in [0, 65535] are 16-bit (scaled as above); any other
      range is min-max rescaled to [0, 255].
    - ``F`` (32-bit float): values in [0, 1] are scaled by 255, values in [0, 255] are kept,
      any other range is min-max rescaled; NaN becomes 0.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return _rescale_to_uint8(arr, 65535.0)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        return _rescale_to_uint8(arr, 1.0)
    if lo >= 0.0 and hi <= 255.0:
        return _rescale_to_uint8(arr, 255.0)
    if img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        return _rescale_to_uint8(arr, 65535.0)
    span = hi - lo if hi > lo else 1.0
    return _rescale_to_uint8((arr.astype(np.float64) - lo) / span, 1.0)


def _composite(rgba: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """uint8 (H, W, 4) -> uint8 (H, W, 3) over :data:`TRANSPARENCY_BACKGROUND`:
    ``c a + bg (1 - a)`` (``c + bg (1 - a)`` for premultiplied colour)."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    colour = rgba[..., :3].astype(np.float64)
    if not premultiplied:
        colour = colour * alpha
    out = colour + np.asarray(TRANSPARENCY_BACKGROUND, np.float64) * (1.0 - alpha)
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Decode a PIL image of any mode to an 8-bit ``RGB`` image.

    - 16-bit and 32-bit greyscale (``I;16*``, ``I``, ``F``) are scaled by their bit depth /
      value range (see :func:`_grey_to_uint8`), not clipped at 255 as ``Image.convert`` does
      (which turns a 16-bit PNG all white).
    - Transparency (an alpha band: ``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``; or a
      ``transparency`` entry: palette ``P`` / ``L`` / ``RGB`` with a tRNS colour) is composited
      on :data:`TRANSPARENCY_BACKGROUND` (white), not dropped (dropping it shows whatever
      colour the transparent pixels happen to store, often black).
    - ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` use PIL's conversions.

    Returns a new image (the input is not modified); an ``RGB`` input without transparency is
    returned as a copy. Raises ``ValueError`` naming the mode when PIL cannot convert it.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(img)).convert("RGB")
    if mode in ("RGBa", "La"):
        arr = np.asarray(img)
        if mode == "La":
            arr = np.concatenate([arr[..., :1].repeat(3, axis=-1), arr[..., 1:2]], axis=-1)
        return Image.fromarray(_composite(arr, premultiplied=True))
    has_alpha = mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    try:
        if has_alpha:
            return Image.fromarray(_composite(np.asarray(img.convert("RGBA"))))
        return img.convert("RGB") if mode != "RGB" else img.copy()
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {e}") from e


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open a local image file as an 8-bit RGB PIL image (fully read; the file is closed).

    Every PIL mode is decoded by :func:`pil_to_rgb` (16-bit greyscale scaled by its bit depth,
    transparency composited on white). URLs are rejected on purpose: dmvae never fetches images
    over the network.
    """
    text = str(path)
    if "://" in text:
        raise ValueError(f"load_image takes a local file path, got a URL {text!r}; download it first")
    p = Path(os.path.expanduser(text))
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    return decode_image(p, str(p))


def decode_image(source: str | os.PathLike[str] | IO[bytes], where: str) -> Image.Image:
    """Open, fully read and convert to RGB one image (a path or a binary file object, e.g. the
    ``io.BytesIO`` of a tar member); an unreadable image raises ``ValueError`` naming ``where``."""
    try:
        with Image.open(source) as img:
            img.load()
            return pil_to_rgb(img)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"could not read {where} as an image: {e}") from e


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop, the one in dmvae: halve with BOX filtering while the short side is
    >= 2 * image_size, BICUBIC-resize so the short side equals ``image_size``, then crop the
    centre square. Any PIL mode is read as 8-bit RGB first (:func:`pil_to_rgb`). The standard crop
    for ImageNet rFID and the ADM reference batches; as a transform,
    ``functools.partial(center_crop_arr, image_size=S)``."""
    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(pil_image).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    pil_image = pil_to_rgb(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _to_uint8_hwc(image: ImageLike, size: int | None) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise TypeError(
                f"numpy images must be uint8 arrays of shape (H, W, 3), got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected PIL images or uint8 numpy arrays, got {type(image).__name__}")
    if image.mode != "RGB" or "transparency" in image.info:
        image = pil_to_rgb(image)
    if size is not None:
        image = center_crop_arr(image, size)
    return np.asarray(image, dtype=np.uint8)


def pil_to_tensor(
    images: ImageLike | Sequence[ImageLike], size: int | None = None
) -> Tensor:
    """PIL image(s) or uint8 (H, W, 3) / (B, H, W, 3) arrays -> float32 (B, 3, H, W) in [-1, 1].

    Args:
        images: one image or a sequence of images (converted to RGB).
        size: if given, each image is ADM-centre-cropped to ``size x size`` first; otherwise all
            images must already share one size.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or len(images) == 0:
        raise TypeError(
            f"expected a PIL image or a non-empty sequence of images, got {type(images).__name__}"
        )
    arrays = [_to_uint8_hwc(img, size) for img in images]
    shapes = sorted({a.shape[:2] for a in arrays})
    if len(shapes) > 1:
        raise ValueError(
            f"images have different sizes (H, W) {shapes}; pass size= to centre-crop them to one size"
        )
    batch = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3) uint8
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 of the same shape: ``trunc(clamp(127.5 x + 128, 0, 255))``.

    The one float -> 8-bit conversion of dmvae (reconstructions, samples, the npz writer, the
    metrics): the reference's conversion, i.e. ``127.5 x + 127.5`` rounded half-up, so
    ``uint8 -> x -> uint8`` is the identity; values outside [-1, 1] saturate. (ADM's
    ``((x + 1) * 127.5).to(uint8)`` truncates instead, darkening every image by half a level on
    average.) uint8 input is returned unchanged; NaN / inf raise ``ValueError`` (a NaN would
    otherwise become a silent black pixel).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected a float image tensor in [-1, 1] or uint8, got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values; cannot convert to uint8")
    return torch.clamp(127.5 * images.detach().float() + 128.0, 0, 255).to(torch.uint8)  # trunc = floor


def to_uint8_numpy(x: Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) images in [-1, 1] -> uint8 numpy (B, H, W, 3) (see :func:`to_uint8`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point images in [-1, 1], got dtype {x.dtype}")
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) images in [-1, 1] -> list of RGB PIL images (see
    :func:`to_uint8_numpy` for the rounding)."""
    return [Image.fromarray(a) for a in to_uint8_numpy(x)]


# ################################################################################################
# folders of images, evaluation crops
# ################################################################################################


def list_images(root: str | os.PathLike[str], num: int | None = None) -> list[Path]:
    """All files with an :data:`IMAGE_EXTENSIONS` suffix under ``root`` (recursive: a flat folder or
    an ImageNet ``<split>/<wnid>/*.JPEG`` tree), sorted by relative path.

    ``num`` picks ``num`` of them spread evenly over that order (index ``i * total // num``), so a
    subset covers every class folder and is the same on every run and for every batch size.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    if num is not None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive int, got {num!r}")
        if num > len(files):
            raise ValueError(f"asked for {num} images but {root} holds only {len(files)}")
        files = [files[i * len(files) // num] for i in range(num)]
    return files


def folder_class_labels(
    root: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]]
) -> tuple[list[int], list[str]] | None:
    """Class labels of ``files`` from the ImageNet class-folder layout ``<root>/<class>/...``.

    Returns ``(labels, classes)`` with ``label = index of the file's top folder in the sorted
    class names``, or ``None`` when some file lies directly in ``root`` (a flat folder has no
    classes). Files outside ``root`` raise ``ValueError``.
    """
    root = Path(root)
    tops = []
    for f in files:
        try:
            parts = Path(f).relative_to(root).parts
        except ValueError:
            raise ValueError(f"{f} is not under {root}") from None
        if len(parts) < 2:
            return None
        tops.append(parts[0])
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in tops], classes


def resize_center_crop(image: Image.Image, image_size: int = 256, resize_ratio: float = 1.5) -> np.ndarray:
    """The DMVAE reference's validation transform, (S, S, 3) uint8: short side to
    ``int(resize_ratio * S)`` (384 for 256) with LANCZOS (torchvision ``Resize``: long side
    ``int(size * long / short)``), then torchvision ``CenterCrop`` (offsets
    ``round((dim - S) / 2)``).

    This is *not* ADM's crop: it keeps less of the image (a 2/3 centre window) and so gives lower
    rFIDs than :func:`center_crop_arr`. Use it only to reproduce the reference's training-time
    numbers.
    """
    image = pil_to_rgb(image)
    w, h = image.size
    short = int(resize_ratio * image_size)
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    arr = np.asarray(image)
    top = int(round((arr.shape[0] - image_size) / 2.0))
    left = int(round((arr.shape[1] - image_size) / 2.0))
    return arr[top : top + image_size, left : left + image_size].copy()  # writable, contiguous


# ################################################################################################
# grids
# ################################################################################################


def make_grid(images: np.ndarray | Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile images into one (rows (H + p) + p, cols (W + p) + p, 3) uint8 array, black borders.

    Args:
        images: uint8 (B, H, W, 3), or a tensor (B, 3, H, W) uint8 / float in [-1, 1]
            (converted by :func:`to_uint8`).
        nrow: images per row (default ``ceil(sqrt(B))``).
        padding: border width p in pixels between and around the tiles.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        images = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"expected uint8 images (B, H, W, 3) with B >= 1, got {images.dtype} {images.shape}")
    b, h, w, _ = images.shape
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1):
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    cols = min(nrow or math.ceil(math.sqrt(b)), b)
    rows = math.ceil(b / cols)
    p = padding
    canvas = np.zeros((rows * (h + p) + p, cols * (w + p) + p, 3), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        y0, x0 = p + r * (h + p), p + c * (w + p)
        canvas[y0 : y0 + h, x0 : x0 + w] = images[i]
    return canvas


def save_image_grid(
    images: np.ndarray | Tensor,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    padding: int = 2,
    *,
    overwrite: bool = True,
) -> Path:
    """:func:`make_grid` written with :func:`save_image` (format from the suffix, e.g. ``.png``).

    ``overwrite=False`` refuses an existing file (``FileExistsError``).
    """
    _check_target(Path(path), overwrite)  # before the grid is built
    return save_image(make_grid(images, nrow, padding), path, overwrite=overwrite)


def _check_target(path: Path, overwrite: bool) -> str:
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format from the suffix of {path} (use .png, .jpg, ...)")
    return fmt


def save_image(image: Image.Image | np.ndarray, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """Write one image atomically (:func:`dmvae.files.atomic_write_bytes`): the one image save of
    dmvae (CLI outputs, grids, figures). ``image`` is a PIL image or a uint8 (H, W, 3) array; the
    format comes from the suffix (``.png``, ``.jpg``, ...). ``overwrite=False`` refuses an existing
    file (``FileExistsError``)."""
    import io

    from dmvae.files import atomic_write_bytes

    path = Path(path)
    fmt = _check_target(path, overwrite)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return atomic_write_bytes(path, buf.getvalue())
