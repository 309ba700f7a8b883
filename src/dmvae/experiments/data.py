"""Small labelled image sets held in memory, with a fixed stratified held-out split.

Two sources:

* ``"digits"``: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``, shipped with
  the package, no download): 1,797 real 8x8 greyscale scans of 0..16 ink, 10 classes. They are
  upscaled bilinearly to ``image_size`` and replicated to 3 channels, ink = +1, paper = -1.
* a folder of class sub-folders (``DIR/<class>/*.png``, ImageNet-style): every image decoded to
  RGB by :func:`dmvae.image.load_image`, ADM centre crop to ``image_size``.

Images are float32 (N, 3, S, S) in [-1, 1]; labels int64 (N,) in [0, K).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageSet", "load_image_set", "holdout_split"]


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


def _digits(image_size: int) -> ImageSet:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the default data set is scikit-learn's digits: pip install scikit-learn "
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
    from dmvae.image import center_crop_adm, folder_class_labels, list_images, load_image

    files = list_images(root)
    found = folder_class_labels(root, files)
    if found is None:
        raise ValueError(
            f"{root} has images directly in it; expected one sub-folder per class "
            "(DIR/<class>/<image>), as in ImageNet's train/<wnid>/ layout"
        )
    labels, classes = found
    if len(classes) < 2:
        raise ValueError(f"{root} holds a single class folder ({classes[0]!r}); need at least 2 classes")
    arr = np.stack([center_crop_adm(load_image(f), image_size) for f in files])  # (N, S, S, 3) uint8
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
            raise ValueError(f"class {c} has {idx.numel()} image(s); a held-out split needs at least 2 per class")
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = min(max(1, round(fraction * idx.numel())), idx.numel() - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values
