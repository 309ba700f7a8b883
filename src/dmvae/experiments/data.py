"""Labelled image sets held in memory, with fixed training / held-out splits.

Three sources, chosen by ``--data`` (:func:`load_data`):

* ``"fashion-mnist:ROOT"``: Fashion-MNIST (Zalando, 70,000 real 28x28 greyscale photographs of 10
  clothing classes) from its four IDX files in ROOT, gzipped or not, either flat (as the Debian
  package ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``) or in
  torchvision's ``ROOT/FashionMNIST/raw/`` layout. ``"fashion-mnist"`` alone uses a copy in the
  Debian folder or :data:`DEFAULT_ROOT`, else downloads through torchvision where a network exists.
  Training images come from the training file (``train_per_class`` per class for the autoencoders
  and DiTs; all 60,000 for the pretrained encoders and the evaluation classifier), held-out images
  from the test file (``held_per_class`` per class): never seen by any model.
* ``"digits"`` (or None): scikit-learn's handwritten digits (1,797 real 8x8 scans, no download).
* a folder of class sub-folders (``DIR/<class>/*.png``, ImageNet-style).

For the last two the held-out split is a stratified fraction (:func:`holdout_split`) and the
pretraining set is the training split. Images are float32 (N, 3, S, S) in [-1, 1] (greyscale
replicated to 3 channels), labels int64 (N,) in [0, K).
"""

from __future__ import annotations

import gzip
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEBIAN_ROOT",
    "DEFAULT_ROOT",
    "FASHION_CLASSES",
    "DataBundle",
    "DataError",
    "ImageSet",
    "find_fashion_mnist",
    "holdout_split",
    "load_data",
    "load_image_set",
    "per_class_subset",
    "read_idx",
]

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")  # dataset-fashion-mnist's folder
DEFAULT_ROOT = Path(os.environ.get("DMVAE_DATA", Path.home() / ".cache" / "dmvae" / "datasets"))
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """The data named by ``--data`` cannot be used (unreadable file, wrong layout, too few images)."""


@dataclass
class ImageSet:
    """Images (N, 3, S, S) float32 in [-1, 1], labels (N,) int64, one name per class."""

    images: Tensor
    labels: Tensor
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names, self.source)


@dataclass
class DataBundle:
    """``train``: the autoencoders' and DiTs' images; ``held``: the fixed held-out images (never
    trained on); ``pretrain``: what the SSL / supervised encoders and the evaluation classifier
    see (a superset of ``train``, disjoint from ``held``)."""

    train: ImageSet
    held: ImageSet
    pretrain: ImageSet
    source: str


# ---- IDX files (Fashion-MNIST) -----------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): 2 zero bytes, a type code, the number of dimensions,
    big-endian uint32 sizes, then the values. Raises ValueError naming the file when it is not one."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read an IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (expected 0x00 0x00 <type> <ndim> as the first bytes)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions)")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != need:
        raise DataError(f"{path}: IDX header says shape {shape} ({need} bytes) but {len(raw) - head} bytes follow")
    return np.frombuffer(raw, dtype, offset=head).reshape(shape)


def find_fashion_mnist(root: str | os.PathLike[str]) -> dict[str, Path] | None:
    """The four IDX files under ``root`` (flat or ``FashionMNIST/raw/``, ``.gz`` or not), or None."""
    root = Path(root)
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        found = {}
        for key, name in FASHION_FILES.items():
            hit = next((folder / n for n in (name, name + ".gz") if (folder / n).is_file()), None)
            if hit is None:
                break
            found[key] = hit
        if len(found) == len(FASHION_FILES):
            return found
    return None


def _network_available(host: str = "github.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _fashion_root(root: str | None) -> dict[str, Path]:
    """The IDX files for ``--data fashion-mnist[:ROOT]``; a download only without ROOT."""
    where = "`sudo apt-get install dataset-fashion-mnist` (Debian) or pass --data fashion-mnist:ROOT"
    if root:
        files = find_fashion_mnist(root)
        if files is None:
            raise FileNotFoundError(
                f"--data fashion-mnist:{root}: no Fashion-MNIST IDX files there (expected "
                f"{', '.join(FASHION_FILES.values())}, optionally .gz, in {root} or {root}/FashionMNIST/raw)")
        return files
    for candidate in (DEBIAN_ROOT, DEFAULT_ROOT):
        files = find_fashion_mnist(candidate)
        if files is not None:
            return files
    if not _network_available():  # checked first: importing torchvision alone takes seconds
        raise FileNotFoundError(
            f"--data fashion-mnist: not found in {DEBIAN_ROOT} or {DEFAULT_ROOT} and no network to "
            f"download it into {DEFAULT_ROOT}; {where}")
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError:
        raise FileNotFoundError(
            f"--data fashion-mnist: not found in {DEBIAN_ROOT} or {DEFAULT_ROOT} and torchvision (the "
            f"downloader) is not installed; {where}") from None
    for train in (True, False):
        FashionMNIST(str(DEFAULT_ROOT), train=train, download=True)
    files = find_fashion_mnist(DEFAULT_ROOT)
    if files is None:  # pragma: no cover - torchvision changed its layout
        raise FileNotFoundError(f"torchvision downloaded Fashion-MNIST but not into {DEFAULT_ROOT}/FashionMNIST/raw")
    return files


def _to_images(raw: np.ndarray, image_size: int) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 3, S, S) in [-1, 1]; the channel copies are a view."""
    x = torch.from_numpy(raw.astype(np.float32) / 255.0)[:, None]
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1)


def per_class_subset(labels: Tensor, per_class: int, seed: int) -> Tensor:
    """Sorted indices of ``per_class`` images of every class (all of a smaller class), drawn by a
    permutation from ``seed``: depends only on the labels, ``per_class`` and ``seed``."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=g)][:per_class])
    return torch.cat(picks).sort().values


def _fashion(root: str | None, image_size: int, train_per_class: int, held_per_class: int,
             split_seed: int) -> DataBundle:
    files = _fashion_root(root)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for part in ("train", "test"):
        n_img, n_lab = arrays[f"{part}_images"].shape[0], arrays[f"{part}_labels"].shape[0]
        if arrays[f"{part}_images"].ndim != 3 or n_img != n_lab:
            raise DataError(f"Fashion-MNIST {part} files disagree: images {arrays[f'{part}_images'].shape}, "
                             f"labels {arrays[f'{part}_labels'].shape}")
    source = f"Fashion-MNIST ({files['train_images'].parent})"
    pre = ImageSet(_to_images(arrays["train_images"], image_size),
                   torch.from_numpy(arrays["train_labels"].astype(np.int64)), list(FASHION_CLASSES), source)
    test_labels = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    held_idx = per_class_subset(test_labels, held_per_class, split_seed)
    held = ImageSet(_to_images(arrays["test_images"][held_idx.numpy()], image_size), test_labels[held_idx],
                    list(FASHION_CLASSES), source)
    train = pre.subset(per_class_subset(pre.labels, train_per_class, split_seed))
    return DataBundle(train, held, pre, source)


# ---- digits and class folders ------------------------------------------------------------------


def _digits(image_size: int) -> ImageSet:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set is scikit-learn's: pip install scikit-learn "
            '(or "dmvae[experiments]"), or pass --data DIR with a class-folder image set'
        ) from e
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S), ink = +1
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageSet(x, y, [str(int(c)) for c in bunch.target_names], "sklearn.datasets.load_digits")


def _folder(root: str | os.PathLike[str], image_size: int) -> ImageSet:
    from dmvae.image import (
        center_crop_arr,
        folder_class_labels,
        list_images,
        load_image,
    )

    files = list_images(root)
    found = folder_class_labels(root, files)
    if found is None:
        raise DataError(
            f"{root} has images directly in it; expected one sub-folder per class "
            "(DIR/<class>/<image>), as in ImageNet's train/<wnid>/ layout"
        )
    labels, classes = found
    if len(classes) < 2:
        raise DataError(f"{root} holds a single class folder ({classes[0]!r}); need at least 2 classes")
    arr = np.stack([np.asarray(center_crop_arr(load_image(f), image_size)) for f in files])  # (N, S, S, 3) uint8
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return ImageSet(x.contiguous(), torch.tensor(labels, dtype=torch.int64), classes, str(root))


def load_image_set(data: str | os.PathLike[str] | None, image_size: int) -> ImageSet:
    """``data=None`` or ``"digits"``: scikit-learn's digits; otherwise a class-folder directory."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if data is None or str(data) == "digits":
        return _digits(image_size)
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data {data}: no such directory (expected DIR/<class>/<image> files)")
    return _folder(data, image_size)


def holdout_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified split: ``round(fraction * n_c)`` images of every class (at least 1, at most
    ``n_c - 1``) held out, chosen by a permutation from ``seed``. Returns sorted (train, held-out)
    index tensors. The split depends only on the labels, ``fraction`` and ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < 2:
            raise DataError(f"class {c} has {idx.numel()} image(s); a held-out split needs at least 2 per class")
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = min(max(1, round(fraction * idx.numel())), idx.numel() - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def load_data(data: str | os.PathLike[str] | None, *, image_size: int, train_per_class: int,
              held_per_class: int, holdout_fraction: float, split_seed: int) -> DataBundle:
    """The three image sets of ``--data`` (see the module docstring); every split is fixed by
    ``split_seed`` and the same for every run seed."""
    spec = None if data is None else str(data)
    if spec is not None and (spec == "fashion-mnist" or spec.startswith("fashion-mnist:")):
        root = spec.partition(":")[2] or None
        return _fashion(root, image_size, train_per_class, held_per_class, split_seed)
    full = load_image_set(data, image_size)
    train_idx, held_idx = holdout_split(full.labels, holdout_fraction, split_seed)
    train = full.subset(train_idx)
    return DataBundle(train, full.subset(held_idx), train, full.source)
