"""Training data: map-style image datasets, the reference's transforms, and the legacy step sampler.

Datasets (all map-style, for ``torch.utils.data.DataLoader`` with
:class:`~dmvae.training.sampler.ResumableDistributedSampler` / :class:`~dmvae.training.sampler.TrainLoader`):

- :class:`ImageFolder`: ``<root>/<class>/*.JPEG`` (ImageNet ``train/<wnid>/``; label = index of the
  sorted class folder) or a flat folder (label 0);
- :class:`ImageList`: a text file of ``<path> [<label>]`` lines (paths relative to the file);
- :class:`SkimagePhotos`: the colour photos bundled with scikit-image (no download), for CPU runs;
- :func:`build_dataset` picks one from a ``--data`` string (``"skimage"``, a folder, a list file).
  Tar shards are streamed by :mod:`dmvae.training.webdataset` instead.

Every item is ``(image, label)``: ``image`` a uint8 tensor (3, S, S) (4x less to move between
processes than float; :func:`to_model_input` makes the model's [-1, 1] float on the device) and
``label`` an int. Files of any PIL mode (16/32-bit grey, palette with transparency, CMYK, LA, 1-bit)
are decoded to 8-bit RGB by :func:`dmvae.image.pil_to_rgb`.

Transforms (torchvision):

- :func:`train_transform`: the reference's augmentation -- horizontal flip, shorter side resized to
  ``resize_ratio * S`` (1.5, LANCZOS), random ``S`` crop;
- :func:`center_crop_transform`: ADM's centre crop (:func:`dmvae.image.center_crop_arr`) for
  validation, evaluation and the latent cache; :func:`eval_transform` also offers the reference's
  resize-384 + centre crop (:func:`dmvae.image.resize_center_crop`).

Keys: a dataset item is addressed by an index or by ``(index, sample_seed)``. With a seed the random
transform runs under that seed (CPU RNG forked), so a sample's crop and flip depend on the seed only,
not on the worker that loads it, the rank, or a resume.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from dmvae.image import (
    center_crop_arr,
    folder_class_labels,
    list_images,
    load_image,
    pil_to_rgb,
    resize_center_crop,
)

__all__ = [
    "SKIMAGE_PHOTOS",
    "ImageDataset",
    "ImageFolder",
    "ImageList",
    "SkimagePhotos",
    "build_dataset",
    "center_crop_transform",
    "eval_transform",
    "data_identity",
    "file_list_digest",
    "to_model_input",
    "train_transform",
]

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "cat", "immunohistochemistry")
Key = Union[int, tuple[int, int]]


# ################################################################################################
#                                          transforms
# ################################################################################################


def train_transform(image_size: int, *, resize_ratio: float = 1.5, hflip: bool = True) -> T.Compose:
    """The reference's training augmentation: PIL RGB -> uint8 (3, S, S).

    Random horizontal flip, resize of the shorter side to ``round(resize_ratio * S)`` with LANCZOS
    (the reference: 384 for S = 256), random ``S`` crop.
    """
    if resize_ratio < 1.0:
        raise ValueError(f"resize_ratio must be >= 1 (the crop is taken from the resized image), got {resize_ratio}")
    steps: list[Any] = [T.RandomHorizontalFlip()] if hflip else []
    steps += [T.Resize(round(resize_ratio * image_size), interpolation=T.InterpolationMode.LANCZOS),
              T.RandomCrop(image_size), T.PILToTensor()]
    return T.Compose(steps)


def center_crop_transform(image_size: int, *, hflip: bool = False) -> T.Compose:
    """ADM centre crop (validation, latent cache): PIL RGB -> uint8 (3, S, S); ``hflip`` flips always."""
    steps: list[Any] = [functools.partial(center_crop_arr, image_size=image_size)]
    if hflip:
        steps.append(T.RandomHorizontalFlip(p=1.0))
    return T.Compose([*steps, T.PILToTensor()])


def _resize_center_crop(img: Image.Image, image_size: int) -> torch.Tensor:
    return torch.from_numpy(resize_center_crop(img, image_size)).permute(2, 0, 1).contiguous()


def eval_transform(image_size: int, crop: str = "adm") -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation crop, PIL RGB -> uint8 (3, S, S): ``"adm"`` is ADM's centre crop (the
    standard for rFID, :func:`center_crop_transform`), ``"dmvae"`` the reference's resize-384 +
    centre crop (:func:`dmvae.image.resize_center_crop`)."""
    if crop == "adm":
        return center_crop_transform(image_size)
    if crop == "dmvae":
        return functools.partial(_resize_center_crop, image_size=image_size)
    raise ValueError(f"crop must be 'adm' or 'dmvae', got {crop!r}")


def to_model_input(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] on ``device``: ``x / 127.5 - 1`` (copy is async
    from pinned memory)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images from the data pipeline, got {images.dtype}")
    x = images.to(device, non_blocking=True) if device is not None else images
    return x.float().div_(127.5).sub_(1.0)


# ################################################################################################
#                                        data identity
# ################################################################################################


def file_list_digest(sources: Sequence[Any]) -> str:
    """SHA-256 (hex) of a list of samples: each one's name and, for a path, its size in bytes (so a
    replaced image of the same name changes the digest; a missing file counts as size -1)."""
    import hashlib

    h = hashlib.sha256()
    for s in sources:
        size = ""
        if isinstance(s, os.PathLike):
            try:
                size = str(os.stat(s).st_size)
            except OSError:
                size = "-1"
        h.update(f"{os.fspath(s) if isinstance(s, os.PathLike) else s}\t{size}\n".encode())
    return h.hexdigest()


def data_identity(dataset: Any) -> str | None:
    """What identifies ``dataset``'s samples, or None when nothing does: its ``data_identity()``
    method (the datasets here, :class:`~dmvae.latent_cache.LatentDataset`), else, for a
    ``torch.utils.data.Subset``, the parent's identity and the indices."""
    method = getattr(dataset, "data_identity", None)
    if callable(method):
        return method()
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        parent = data_identity(dataset.dataset)
        return None if parent is None else file_list_digest([parent, *map(int, dataset.indices)])
    return None


# ################################################################################################
#                                           datasets
# ################################################################################################


def _skimage_photo(name: str) -> Image.Image:
    from skimage import data

    arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return pil_to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


class ImageDataset(Dataset):
    """A list of ``(source, label)`` samples with a transform; see the module docstring for keys.

    Args:
        samples: ``(path, label)`` pairs (subclasses may use other sources, see :meth:`load`).
        transform: PIL RGB image -> tensor (default: uint8 via ``PILToTensor``).
        num_classes: default ``max(label) + 1``.
    """

    def __init__(self, samples: Sequence[tuple[Any, int]], transform: Callable | None = None, *,
                 num_classes: int | None = None, classes: Sequence[str] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform if transform is not None else T.PILToTensor()
        self.num_classes = num_classes if num_classes is not None else 1 + max((s[1] for s in self.samples), default=0)
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s[1] for s in self.samples]

    def data_identity(self) -> str:
        """Digest of the sample list (names, sizes of the files, labels): what a resumed loader checks."""
        if getattr(self, "_identity", None) is None:
            self._identity = file_list_digest([x for s in self.samples for x in (s[0], f"label={s[1]}")])
        return self._identity

    def load(self, index: int) -> Image.Image:
        """The RGB image of sample ``index`` before the transform."""
        return load_image(self.samples[index][0])

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        index, seed = (key, None) if isinstance(key, (int, np.integer)) else key
        img = self.load(int(index))
        if seed is None:
            out = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                out = self.transform(img)
        return out, int(self.samples[int(index)][1])


class ImageFolder(ImageDataset):
    """Images under ``root`` (:func:`dmvae.image.list_images`): the one folder dataset, for
    training, evaluation and the latent cache. ``labels="auto"``: class folders when every image
    lies in a sub-folder (ImageNet ``train/<wnid>/``; label = sorted folder index,
    :func:`dmvae.image.folder_class_labels`), else flat (label 0); ``"folders"`` / ``"none"`` force
    one of the two. ``num`` keeps that many images spread evenly over the sorted list."""

    def __init__(self, root: str | os.PathLike[str], transform: Callable | None = None, *,
                 labels: str = "auto", num: int | None = None) -> None:
        root = Path(root)
        if labels not in ("auto", "folders", "none"):
            raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
        files = list_images(root, num)
        found = folder_class_labels(root, files) if labels != "none" else None
        if found is None and labels == "folders":
            top = next(p for p in files if len(p.relative_to(root).parts) == 1)
            raise ValueError(f"{root}: class-folder layout expected, but {top.name} lies directly in the root")
        if found is not None:
            super().__init__(list(zip(files, found[0])), transform, num_classes=len(found[1]), classes=found[1])
        else:
            super().__init__([(p, 0) for p in files], transform, num_classes=1)
        self.root = root


class ImageList(ImageDataset):
    """Images named in a text file, one ``<path> [<label>]`` per line (whitespace or comma
    separated; ``#`` comments and blank lines skipped). Relative paths are taken from ``root``
    (default: the list file's folder); a missing label is 0."""

    def __init__(self, list_file: str | os.PathLike[str], transform: Callable | None = None, *,
                 root: str | os.PathLike[str] | None = None) -> None:
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"file list not found: {list_file}")
        base = Path(root) if root is not None else list_file.parent
        samples = []
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(",", " ").split()
            if len(parts) > 2:
                raise ValueError(f"{list_file}:{n}: expected '<path> [<label>]', got {line!r}")
            try:
                label = int(parts[1]) if len(parts) == 2 else 0
            except ValueError:
                raise ValueError(f"{list_file}:{n}: the label must be an integer, got {parts[1]!r}") from None
            if label < 0:
                raise ValueError(f"{list_file}:{n}: labels must be >= 0, got {label}")
            path = Path(parts[0])
            samples.append((path if path.is_absolute() else base / path, label))
        if not samples:
            raise ValueError(f"{list_file} lists no images")
        super().__init__(samples, transform)


class SkimagePhotos(ImageDataset):
    """The colour photos bundled with scikit-image, each repeated ``repeats`` times per epoch (a
    handful of photos would not fill a batch otherwise); label 0. For CPU demos and tests."""

    def __init__(self, transform: Callable | None = None, *, repeats: int = 16,
                 names: Sequence[str] = SKIMAGE_PHOTOS) -> None:
        super().__init__([(n, 0) for _ in range(repeats) for n in names], transform, num_classes=1)
        self._cache: dict[str, Image.Image] = {}

    def load(self, index: int) -> Image.Image:
        name = self.samples[index][0]
        if name not in self._cache:
            self._cache[name] = _skimage_photo(name)
        return self._cache[name]


def build_dataset(source: str | os.PathLike[str], transform: Callable | None = None) -> ImageDataset:
    """``"skimage"``, an image folder, or a file list (a file: ``.txt`` / ``.csv`` / ``.lst``)."""
    text = str(source)
    if text == "skimage":
        return SkimagePhotos(transform)
    path = Path(text)
    if path.is_dir():
        return ImageFolder(path, transform)
    if path.is_file():
        return ImageList(path, transform)
    raise FileNotFoundError(
        f"--data {text}: no such folder or file list (give an image folder, a file list, or 'skimage')"
    )
