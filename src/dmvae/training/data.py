"""Step-indexed training batches: real photos for CPU runs, image folders for real runs.

``TrainImages.batch(step, batch_size, rank, world_size)`` is a pure function of (seed, step): the
global batch (image indices, crop offsets, flips) is drawn from a generator seeded with the step,
and each process materialises its contiguous slice. So resuming at step s sees exactly the batches
an uninterrupted run would, and N processes with batch b see the same global batch as one process
with batch N*b. The augmentation is the reference's training transform: random horizontal flip,
resize of the shorter side to ``resize_ratio * image_size`` (LANCZOS), random ``image_size`` crop,
[-1, 1].

Sources:
- ``"skimage"``: the colour photos bundled with scikit-image (astronaut, coffee, chelsea, rocket,
  motorcycle, ...), no download;
- a folder: every image under it, recursively. If the root holds class sub-folders
  (``<root>/<class>/*.JPEG``, the ImageNet layout) the label is the sorted class-folder index,
  otherwise all labels are 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["TrainImages", "SKIMAGE_PHOTOS"]

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "cat", "immunohistochemistry")
_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _skimage_photo(name: str) -> Image.Image:
    from skimage import data

    if name == "motorcycle":
        arr = data.stereo_motorcycle()[0]
    else:
        arr = getattr(data, name)()
    return Image.fromarray(np.ascontiguousarray(arr[..., :3])).convert("RGB")


class TrainImages:
    """Step-indexed random crops of a photo collection.

    Args:
        source: ``"skimage"`` or a folder path.
        image_size: crop side S (pixels).
        resize_ratio: the shorter side is resized to ``round(resize_ratio * S)`` before cropping
            (reference: 384 / 256 = 1.5).
        hflip: random horizontal flips.
        seed: base seed of the step-indexed draws.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = "skimage",
        image_size: int = 64,
        *,
        resize_ratio: float = 1.5,
        hflip: bool = True,
        seed: int = 0,
    ) -> None:
        if resize_ratio < 1.0:
            raise ValueError(f"resize_ratio must be >= 1 (the crop is taken from the resized image), got {resize_ratio}")
        self.image_size, self.resize_ratio, self.hflip, self.seed = image_size, resize_ratio, hflip, seed
        self.short_side = round(resize_ratio * image_size)
        self._cache: dict[int, Image.Image] = {}
        if str(source) == "skimage":
            self.files: list[Path | str] = list(SKIMAGE_PHOTOS)
            self.labels = [0] * len(self.files)
            self.num_classes = 1
        else:
            root = Path(source)
            if not root.is_dir():
                raise FileNotFoundError(f"image folder not found: {root} (or use source='skimage')")
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _EXTS and p.is_file())
            if not files:
                raise FileNotFoundError(f"no images ({sorted(_EXTS)}) under {root}")
            classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
            index = {c: i for i, c in enumerate(classes)}
            self.files = list(files)
            self.labels = [index.get(p.relative_to(root).parts[0], 0) if classes else 0 for p in files]
            self.num_classes = max(1, len(classes))

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Image.Image:
        # resized to the pre-crop size; cached for the small photo set, reloaded for folders
        if i in self._cache:
            return self._cache[i]
        f = self.files[i]
        if isinstance(f, str):
            im = _skimage_photo(f)
        else:
            with Image.open(f) as raw:
                im = raw.convert("RGB")
        w, h = im.size
        s = self.short_side / min(w, h)
        im = im.resize((max(self.short_side, round(w * s)), max(self.short_side, round(h * s))), Image.LANCZOS)
        if isinstance(f, str):
            self._cache[i] = im
        return im

    def batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of the global batch of ``step``: images (b, 3, S, S) in [-1, 1]
        and labels (b,) int64, with b = ``batch_size`` (the per-process batch)."""
        g = np.random.default_rng([self.seed, step])
        total = batch_size * world_size
        idx = g.integers(0, len(self.files), total)
        u = g.random((total, 2))  # crop offsets as fractions of the free range
        flip = g.random(total) < 0.5
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        images, labels = [], []
        s = self.image_size
        for k in range(lo, hi):
            im = self._load(int(idx[k]))
            w, h = im.size
            x0, y0 = int(u[k, 0] * (w - s + 1)), int(u[k, 1] * (h - s + 1))
            arr = np.asarray(im.crop((x0, y0, x0 + s, y0 + s)), dtype=np.float32)
            if self.hflip and flip[k]:
                arr = arr[:, ::-1]
            images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))  # (3, S, S)
            labels.append(self.labels[int(idx[k])])
        x = torch.stack(images) / 127.5 - 1.0  # (b, 3, S, S) in [-1, 1]
        return x, torch.tensor(labels, dtype=torch.int64)
