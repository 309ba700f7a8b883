"""Streaming training images from tar shards (``webdataset``; ``pip install "dmvae[shards]"``).

1.28 M small JPEGs on a network file system is the classic ImageNet input bottleneck; tar shards turn
it into large sequential reads. A shard holds samples as consecutive files sharing a key
(``n01440764_10026.jpg`` + ``n01440764_10026.cls`` with the integer label), as written by
``webdataset.TarWriter`` / ``ShardWriter`` or ``tar`` of such pairs.

:class:`ShardLoader` gives the same batches interface as :class:`~dmvae.training.sampler.TrainLoader`
(uint8 (b, 3, S, S), labels (b,)): each process draws shards at random with replacement
(``resampled``; seeded by seed and rank, so processes read different shards), shuffles samples in a
buffer, decodes every PIL mode with :func:`dmvae.image.pil_to_rgb` and applies the transform.
Streams have no exact mid-epoch resume: after a restart the stream continues from a fresh random
position (statistically equivalent); ``state_dict`` records the batches consumed.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from dmvae.image import pil_to_rgb
from dmvae.dist import get_rank

__all__ = ["ShardLoader", "IMAGE_KEYS"]

IMAGE_KEYS = "jpg;jpeg;png;webp;bmp;tif;tiff"


def _require_webdataset() -> Any:
    try:
        import webdataset as wds
    except ImportError:
        raise ImportError("tar-shard data needs webdataset: pip install 'dmvae[shards]' (or pip install webdataset)"
                          ) from None
    return wds


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return pil_to_rgb(img)


class ShardLoader:
    """Endless batches streamed from tar shards.

    Args:
        urls: brace pattern or list (``"/data/imagenet-train-{0000..1023}.tar"``).
        transform: PIL RGB -> uint8 tensor (e.g. :func:`~dmvae.training.data.train_transform`).
        batch_size: per process.
        seed: stream seed (combined with the rank).
        num_workers: DataLoader workers (each reads its own shards).
        shuffle_buffer: samples held for shuffling.
        num_classes: the label count, when the model needs it (shards carry no class list).
    """

    def __init__(self, urls: str | list[str], transform: Callable, batch_size: int, *, seed: int = 0,
                 num_workers: int = 0, shuffle_buffer: int = 1000, num_classes: int | None = None) -> None:
        wds = _require_webdataset()
        self._num_classes = num_classes
        self.batch_size = batch_size
        rank = get_rank()
        dataset = (
            wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed * 1009 + rank,
                           nodesplitter=None, empty_check=False)
            .shuffle(shuffle_buffer, rng=random.Random(seed * 7919 + rank))
            .to_tuple(IMAGE_KEYS, "cls")  # raw bytes: decoded here, every PIL mode by bit depth
            .map_tuple(lambda data: transform(_decode(data)), int)
            .batched(batch_size, partial=False)
        )
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                                  pin_memory=torch.cuda.is_available())
        self.epoch, self.batch_in_epoch = 0, 0
        self._it = None

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            raise ValueError("tar shards carry no class list: pass --num-classes")
        return self._num_classes

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        images, labels = next(self._it)
        self.batch_in_epoch += 1
        return images, torch.as_tensor(labels, dtype=torch.int64)

    def state_dict(self) -> dict[str, int]:
        return {"stream_batches": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_in_epoch = int(state.get("stream_batches", 0))  # the stream itself restarts at random
