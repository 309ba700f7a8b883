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
position (statistically equivalent); ``state_dict`` records the batches consumed and a digest of the
shard list (names, and sizes of local files): a resume over other shards is refused.

Empty input ends instead of spinning: local shards that are missing or hold no file are refused when
the loader is built, and a stream that reads ``10 * len(shards) + 10`` shards in a row without a
sample raises a ``ValueError`` naming them. A sample without an image or a ``.cls`` label is an error
naming its shard and key.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dmvae.dist import get_rank
from dmvae.image import decode_image

__all__ = ["IMAGE_KEYS", "ShardLoader"]

IMAGE_KEYS = "jpg;jpeg;png;webp;bmp;tif;tiff"


def _require_webdataset() -> Any:
    try:
        import webdataset as wds
    except ImportError:
        raise ImportError("tar-shard data needs webdataset: pip install 'dmvae[shards]' (or pip install webdataset)"
                          ) from None
    return wds


def expand_shards(urls: str | list[str]) -> list[str]:
    """The shard list of a brace pattern (``"/data/train-{0000..1023}.tar"``, ``::``-separated) or a list."""
    wds = _require_webdataset()
    return list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else [str(u) for u in urls]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_shards(shards: list[str]) -> None:
    """Refuse an empty shard list, and local shards that are missing or hold no file (remote
    shards are checked while streaming)."""
    if not shards:
        raise ValueError("no tar shards given (the pattern expanded to nothing)")
    missing = [u for u in shards if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} tar shard(s) not found: {', '.join(missing[:3])}"
                                + (" ..." if len(missing) > 3 else ""))
    empty = []
    for u in shards:
        if not _is_local(u):
            continue
        try:
            with tarfile.open(u) as tar:
                if tar.next() is None:
                    empty.append(u)
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{u} is not a readable tar shard ({e})") from None
    if empty:
        raise ValueError(f"{len(empty)} of {len(shards)} tar shard(s) hold no file: {', '.join(empty[:3])}"
                         + (" ..." if len(empty) > 3 else "") + "; remove them from the shard list")


def shard_digest(shards: list[str]) -> str:
    """SHA-256 of the shard names and, for local files, their sizes (what a resume checks):
    :func:`dmvae.training.data.file_list_digest` over the list."""
    from dmvae.training.data import file_list_digest

    return file_list_digest([Path(u) if _is_local(u) else u for u in shards])


class _SamplesOrFail:
    """Pipeline stage: the samples of each drawn shard; raises once ``limit`` shards in a row gave
    none (empty shards would otherwise be drawn forever)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        wds = _require_webdataset()
        misses: list[str] = []
        for shard in src:
            got = 0
            for sample in wds.tarfile_to_samples()(iter([shard])):
                got += 1
                yield sample
            if got:
                misses.clear()
                continue
            misses.append(shard["url"])
            if len(misses) >= self.limit:
                names = sorted(set(misses))
                raise ValueError(f"{len(misses)} tar shards in a row held no sample ({', '.join(names[:3])}"
                                 + (" ..." if len(names) > 3 else "") + "): the shards are empty; check --data")


def _pick(sample: dict[str, Any]) -> tuple[bytes, int, str]:
    """(image bytes, label, where) of a sample; a missing part is an error naming the shard and the key."""
    image = next((sample[k] for k in IMAGE_KEYS.split(";") if k in sample), None)
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}"
    if image is None:
        raise ValueError(f"{where} has no image ({IMAGE_KEYS.replace(';', ', ')}); it has {sorted(sample)}")
    if "cls" not in sample:
        raise ValueError(f"{where} has no .cls label file")
    try:
        return image, int(sample["cls"]), where
    except ValueError:
        raise ValueError(f"{where}: the .cls file must hold an integer, got {sample['cls'][:20]!r}") from None


def _decode(data: bytes, where: str = "tar sample") -> Image.Image:
    return decode_image(io.BytesIO(data), where)


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
        self.shards = expand_shards(urls)
        check_shards(self.shards)
        self._digest = shard_digest(self.shards)
        rank = get_rank()
        dataset = wds.DataPipeline(
            wds.ResampledShards(self.shards, seed=seed * 1009 + rank),
            _SamplesOrFail(10 * len(self.shards) + 10),
            wds.shuffle(shuffle_buffer, rng=random.Random(seed * 7919 + rank)),
            wds.map(_pick),  # raw bytes: decoded here, every PIL mode by bit depth
            wds.map(lambda s: (transform(_decode(s[0], s[2])), s[1])),
            wds.batched(batch_size, partial=False),
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

    def state_dict(self) -> dict[str, Any]:
        return {"stream_batches": self.batch_in_epoch, "data_digest": self._digest}

    def check_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` was saved over the same shards; changes nothing."""
        if not isinstance(state, dict) or "stream_batches" not in state:
            raise ValueError(f"not a ShardLoader state: {state!r}")
        saved = state.get("data_digest")
        if saved is None:
            raise ValueError("cannot resume the stream: nothing identifies the shards of the checkpoint's loader "
                             "state (saved by an older dmvae); start a new run")
        if saved != self._digest:
            raise ValueError(f"cannot resume the stream: the shard list changed since the checkpoint (digest "
                             f"{str(saved)[:12]} saved, {self._digest[:12]} now: other shard names or sizes); "
                             "resume with the same --data")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.batch_in_epoch = int(state["stream_batches"])  # the stream itself restarts at random
