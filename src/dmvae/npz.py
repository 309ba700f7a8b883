"""ADM-evaluator ``.npz`` files: reading, writing, and the resumable sharded writer.

The layout (ADM's ``image_sample.py`` / ``evaluator.py``, torch-fidelity, MAR, DMVAE): an
uncompressed ``.npz`` with ``arr_0`` = uint8 images (N, H, W, 3) (NHWC: the last axis holds the
three colour channels) and, for class-conditional samples, ``arr_1`` = int64 labels (N,).

* :func:`save_npz_images` writes one atomically; :func:`iter_npz_images` streams the images of
  one in chunks without unpickling anything or holding 50k images in memory;
  :func:`load_npz_images` / :func:`npz_image_shape` read all of it / its shape only.
* :class:`ShardedNpzWriter` is the resumable writer behind :func:`dmvae.generate.generate_npz`:
  every batch goes atomically to ``<out>.shards/shard_XXXXXX.npz``; a re-run skips the shards on
  disk; rank 0 streams them into the final file in index order. A *fingerprint* of everything that
  changes the images (weights digests, sampler settings, seed, label layout, ...) is stored in
  ``meta.json`` and in every shard, so a resume with other settings, or a shard copied in from
  another run, is refused instead of silently mixing two runs in one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmvae.checks import check_int
from dmvae.files import atomic_write, atomic_write_bytes, atomic_write_text, require_file

__all__ = [
    "IncompleteShardsError",
    "NpzKeyError",
    "ShardedNpzWriter",
    "check_nhwc_uint8",
    "iter_npz_images",
    "load_npz_images",
    "npz_image_shape",
    "save_npz_images",
]

SHARD_FORMAT = "dmvae-npz-shards/2"


class NpzKeyError(KeyError, ValueError):
    """An ``.npz`` lacks the array a reader needs (a ``KeyError`` for dict-like callers, a
    ``ValueError`` for bad-input handlers); the message lists the keys found."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IncompleteShardsError(RuntimeError):
    """Shards of other ranks are missing when rank 0 merges; re-running completes them."""


def check_nhwc_uint8(shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """Refuse anything but uint8 (N, H, W, 3) images; NCHW arrays get a hint.

    An array whose axis 1 is 3 and whose last axis is not is NCHW; one where both are 3 is
    ambiguous (3-pixel-high images, or NCHW 3-pixel-wide ones) and refused too.
    """
    ok = dtype == np.uint8 and len(shape) == 4 and shape[-1] == 3 and shape[1] != 3
    if ok:
        return
    hint = ""
    if len(shape) == 4 and shape[1] == 3:
        hint = (
            " -- axis 1 has size 3, so this looks like NCHW; transpose it with "
            "images.transpose(0, 2, 3, 1)"
        )
    raise ValueError(
        f"{what}: expected uint8 images of shape (N, H, W, 3) (ADM layout, channels last), "
        f"got {np.dtype(dtype)} {tuple(shape)}{hint}"
    )


def save_npz_images(
    path: str | os.PathLike[str],
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write images in the ADM evaluator's layout: uncompressed ``.npz``, ``arr_0`` = uint8
    (N, H, W, 3) (and ``arr_1`` = int64 labels, as ADM's ``image_sample.py`` writes for
    class-conditional runs).

    ``images`` may be a uint8 NHWC array, or a torch tensor (N, 3, H, W) uint8 or float in [-1, 1]
    (rounded with :func:`dmvae.image.to_uint8`). The file appears atomically, so an interrupted
    write never leaves a truncated npz. ``overwrite=False`` refuses an existing file.
    """
    from dmvae.image import to_uint8

    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
        images = to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    images = np.ascontiguousarray(images)
    check_nhwc_uint8(images.shape, images.dtype, "save_npz_images")
    arrays: dict[str, np.ndarray] = {"arr_0": images}
    if labels is not None:
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {lab.shape}")
        arrays["arr_1"] = lab.astype(np.int64)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@contextlib.contextmanager
def _open_npz_member(path: Path, key: str) -> Iterator[tuple[Any, tuple[int, ...], np.dtype]]:
    """Open ``key`` of an ``.npz`` as a stream positioned at the array data: (file, shape, dtype)."""
    require_file(path, "npz file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable .npz file (corrupt or truncated?): {e}") from e
    with zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key not in names:
            raise NpzKeyError(f"{path}: expected images under key {key!r} (ADM layout), found keys {sorted(names)}")
        with zf.open(f"{key}.npy") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
            except ValueError as e:
                raise ValueError(f"{path}:{key}: not a .npy array: {e}") from e
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}:{key}: expected a C-ordered numeric array")
            yield f, tuple(shape), dtype


def npz_image_shape(path: str | os.PathLike[str], key: str = "arr_0") -> tuple[int, ...]:
    """Shape (N, H, W, 3) of the image array in an ADM ``.npz``, without reading the images;
    any other layout raises ``ValueError``."""
    with _open_npz_member(Path(path), key) as (_, shape, dtype):
        check_nhwc_uint8(shape, dtype, f"{path}:{key}")
        return shape


def iter_npz_images(
    path: str | os.PathLike[str], batch_size: int = 256, key: str = "arr_0"
) -> Iterator[np.ndarray]:
    """Stream the images of an ADM ``.npz`` in chunks of (<= batch_size, H, W, 3) uint8, reading the
    file sequentially (50k 256x256 images are 9.8 GB; they never sit in memory at once)."""
    path = Path(path)
    batch_size = check_int("batch_size", batch_size, 1)
    with _open_npz_member(path, key) as (f, shape, dtype):
        check_nhwc_uint8(shape, dtype, f"{path}:{key}")
        per_image = int(np.prod(shape[1:]))
        remaining = shape[0]
        while remaining > 0:
            b = min(batch_size, remaining)
            buf = f.read(b * per_image)
            if len(buf) != b * per_image:
                raise ValueError(
                    f"{path}:{key} is truncated ({shape[0] - remaining + len(buf) // per_image} of "
                    f"{shape[0]} images)"
                )
            yield np.frombuffer(buf, dtype=np.uint8).reshape((b, *shape[1:]))
            remaining -= b


def load_npz_images(path: str | os.PathLike[str], key: str = "arr_0") -> np.ndarray:
    """All images of an ADM ``.npz`` as one uint8 (N, H, W, 3) array (small files; else use
    :func:`iter_npz_images`). Nothing is unpickled."""
    chunks = list(iter_npz_images(path, batch_size=1 << 30, key=key))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


# ################################################################################################
# the resumable sharded writer
# ################################################################################################


def _digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class ShardedNpzWriter:
    """Resumable, multi-process writer of one ADM ``.npz`` from numbered batches.

    Batch ``b`` holds image indices ``[b * batch_size, min((b + 1) * batch_size, total))`` and is
    written atomically to ``<shard_dir>/shard_{b:06d}.npz`` (keys ``images``, ``labels``,
    ``indices``, ``fingerprint``). :meth:`merge` streams every shard, in index order, into
    ``out_path`` (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels).

    Args:
        out_path: the final ``.npz``.
        total, batch_size: number of images and images per shard.
        fingerprint: JSON-serialisable description of everything that changes the images; a
            shard directory written with another fingerprint is refused (``ValueError`` listing
            what differs).
        shard_dir: default ``<out_path>.shards``.
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        *,
        total: int,
        batch_size: int,
        fingerprint: Mapping[str, Any],
        shard_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if total < 1 or batch_size < 1:
            raise ValueError(f"total and batch_size must be >= 1, got {total}, {batch_size}")
        self.out_path = Path(out_path)
        self.shard_dir = Path(shard_dir) if shard_dir is not None else self.out_path.with_name(
            self.out_path.name + ".shards"
        )
        self.total, self.batch_size = int(total), int(batch_size)
        self.num_batches = -(-self.total // self.batch_size)
        self.fingerprint = {
            "format": SHARD_FORMAT, "total": self.total, "batch_size": self.batch_size, **fingerprint
        }  # fmt: skip
        self.digest = _digest(self.fingerprint)
        self.meta_path = self.shard_dir / "meta.json"

    def open(self) -> ShardedNpzWriter:
        """Create the shard directory, or check that an existing one belongs to this run."""
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        if self.meta_path.is_file():
            from dmvae.files import read_json

            old = read_json(self.meta_path, "shard directory metadata")
            old_fp = old.get("fingerprint") if isinstance(old, dict) else None
            if old_fp != self.fingerprint:
                changes = _diff(old_fp if isinstance(old_fp, dict) else {"<unknown format>": old}, self.fingerprint)
                raise ValueError(
                    f"{self.shard_dir} holds shards of a different run; resuming would mix two runs' "
                    f"images in one file. What differs: {'; '.join(changes[:8])}"
                    f"{' ...' if len(changes) > 8 else ''}. Delete the directory to start over, or "
                    "repeat the original settings to resume."
                )
        else:
            text = json.dumps({"fingerprint": self.fingerprint, "digest": self.digest}, indent=2)
            atomic_write_text(self.meta_path, text + "\n")
        return self

    def shard_path(self, b: int) -> Path:
        return self.shard_dir / f"shard_{b:06d}.npz"

    def _indices(self, b: int) -> tuple[int, int]:
        return b * self.batch_size, min((b + 1) * self.batch_size, self.total)

    def is_done(self, b: int) -> bool:
        """Whether shard ``b`` is on disk and complete. An unreadable (truncated) shard counts as
        not done and is rewritten; a readable shard of another run raises ``ValueError`` naming it."""
        path = self.shard_path(b)
        if not path.is_file():
            return False
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
                fp = str(f["fingerprint"]) if "fingerprint" in keys else None
                idx = f["indices"] if "indices" in keys else None
                shape = f["images"].shape if "images" in keys else None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            return False
        lo, hi = self._indices(b)
        if fp != self.digest or idx is None or not np.array_equal(idx, np.arange(lo, hi)) or shape is None:
            raise ValueError(
                f"{path} is a foreign shard: it was not written by this run (fingerprint "
                f"{fp!r}, expected {self.digest!r}; indices must be {lo}..{hi - 1}). Delete it or the "
                f"whole directory {self.shard_dir}."
            )
        return True

    def pending(self, batches: list[int] | range | None = None) -> list[int]:
        """The batches (default: all) that still have to be computed."""
        return [b for b in (range(self.num_batches) if batches is None else batches) if not self.is_done(b)]

    def write(self, b: int, images: np.ndarray, labels: np.ndarray) -> Path:
        """Atomically write batch ``b``: uint8 (n, H, W, 3) images and their (n,) labels."""
        lo, hi = self._indices(b)
        check_nhwc_uint8(images.shape, images.dtype, f"batch {b}")
        if images.shape[0] != hi - lo or np.shape(labels) != (hi - lo,):
            raise ValueError(
                f"batch {b} must hold {hi - lo} images and labels, got {images.shape[0]} and {np.shape(labels)}"
            )
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=np.asarray(labels, np.int64), indices=np.arange(lo, hi),
                 fingerprint=np.array(self.digest))  # fmt: skip
        return atomic_write_bytes(self.shard_path(b), buf.getvalue())

    def merge(self, *, keep_shards: bool = False) -> Path:
        """Stream all shards into ``out_path`` (atomically) and, unless ``keep_shards``, delete them."""
        missing = [b for b in range(self.num_batches) if not self.is_done(b)]
        if missing:
            raise IncompleteShardsError(
                f"{len(missing)} of {self.num_batches} shards are missing in {self.shard_dir} (first: "
                f"{missing[:5]}); other ranks have not finished. Re-run them (completed shards are skipped)."
            )
        with np.load(self.shard_path(0), allow_pickle=False) as f:
            image_shape = f["images"].shape[1:]
        labels = np.empty(self.total, dtype=np.int64)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.total, *image_shape)}  # fmt: skip
        with atomic_write(self.out_path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for b in range(self.num_batches):
                    lo, hi = self._indices(b)
                    with np.load(self.shard_path(b), allow_pickle=False) as f:
                        images, lab = f["images"], f["labels"]
                    if images.shape[1:] != image_shape:
                        raise ValueError(f"{self.shard_path(b)}: images {images.shape[1:]}, shard 0 has {image_shape}")
                    member.write(np.ascontiguousarray(images).tobytes())
                    labels[lo:hi] = lab
            lab_buf = io.BytesIO()
            np.lib.format.write_array(lab_buf, labels)
            zf.writestr("arr_1.npy", lab_buf.getvalue())
        if not keep_shards:
            for b in range(self.num_batches):
                self.shard_path(b).unlink(missing_ok=True)
            self.meta_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.shard_dir.rmdir()
        return self.out_path
