"""Class-balanced sample generation to an ADM-evaluator ``.npz`` (FID / IS), resumable and sharded.

``generate_npz(dit, vae, "samples.npz", num_per_class=50, num_classes=1000)`` draws
``num_classes * num_per_class`` latents with :func:`dmvae.samplers.sample`, decodes them with
``vae.decode(latents, normalize=True)`` (DiT latents are *normalised* latents), converts them as the
reference does (``clamp(127.5 x + 128, 0, 255)`` truncated to uint8, NHWC) and writes
``np.savez(path, arr_0=images, arr_1=labels)``, the layout the ADM evaluator and torch-fidelity read.

Reproducibility and resumption:

* image ``i`` has label ``i % num_classes`` (:func:`balanced_labels`) and its own starting noise,
  drawn from a generator seeded with ``(seed, i)`` -- independent of batch size and world size;
* SDE noise comes from a generator seeded with ``(seed, batch index)``;
* every batch is written atomically to ``<out>.shards/shard_XXXXXX.npz``; a restart skips the
  shards already on disk, so an interrupted run loses at most one batch and never duplicates one;
* ranks (``torchrun``) take batches ``b`` with ``b % world_size == rank``; rank 0 merges.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmvae.hub import atomic_write_bytes, atomic_write_text
from dmvae.samplers import sample

__all__ = ["balanced_labels", "generate_npz", "sample_seed", "to_uint8"]


def balanced_labels(num_classes: int, num_per_class: int) -> torch.Tensor:
    """``[0, 1, ..., C-1] * num_per_class`` as int64 (every prefix of C labels is one per class)."""
    if num_classes < 1 or num_per_class < 1:
        raise ValueError(
            f"num_classes and num_per_class must be >= 1, got {num_classes}, {num_per_class}"
        )
    return torch.arange(num_classes, dtype=torch.long).repeat(num_per_class)


def sample_seed(seed: int, index: int) -> int:
    """Deterministic 63-bit seed for item ``index`` of a run seeded with ``seed``."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in ~[-1, 1] -> (B, H, W, 3) uint8, ``clamp(127.5 x + 128)`` truncated
    (the reference's conversion)."""
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def _json_safe(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return repr(v)


def _shard_ok(path: Path) -> bool:
    try:
        with np.load(path) as f:
            return "images" in f and "indices" in f
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def generate_npz(
    dit: torch.nn.Module,
    vae: Any,
    out_path: str | os.PathLike[str],
    *,
    num_per_class: int,
    num_classes: int | None = None,
    batch_size: int = 25,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    shard_dir: str | os.PathLike[str] | None = None,
    keep_shards: bool = False,
    **sampler_kwargs: Any,
) -> Path | None:
    """Generate ``num_classes * num_per_class`` class-balanced images into an ADM-format npz.

    Args:
        dit: the velocity model (e.g. :class:`~dmvae.dit.LatentDiT`); its latent shape is read from
            ``dit.config`` (``in_channels``, ``input_size``).
        vae: anything with ``decode(latents, normalize=True) -> (B, 3, H, W)`` in ~[-1, 1].
        out_path: the final ``.npz``.
        num_per_class, num_classes: label layout (``num_classes`` defaults to ``dit.num_classes``).
        batch_size: images per model batch and per shard (must not change when resuming).
        seed: base seed; see the module docstring.
        rank, world_size: this process's share of the batches (``torchrun``: RANK, WORLD_SIZE).
        progress: tqdm bar over this rank's batches.
        device: where to sample (default: the DiT's device).
        autocast_dtype: e.g. ``torch.bfloat16`` to sample and decode under autocast (the release).
        shard_dir: where the per-batch shards go (default ``<out_path>.shards``).
        keep_shards: keep the shard directory after merging.
        **sampler_kwargs: passed to :func:`dmvae.samplers.sample` (``num_steps`` required).

    Returns:
        the merged ``.npz`` path on rank 0, ``None`` on other ranks.
    """
    if "num_steps" not in sampler_kwargs:
        raise ValueError("generate_npz needs the sampler's num_steps= (integration steps)")
    for bad in ("noise", "labels", "generator", "return_trajectory"):
        if bad in sampler_kwargs:
            raise ValueError(f"{bad!r} is chosen by generate_npz and cannot be passed")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = getattr(dit, "config", None)
    if cfg is None:
        raise TypeError("dit must expose .config (in_channels, input_size), e.g. a LatentDiT")
    num_classes = int(num_classes if num_classes is not None else cfg.num_classes)
    labels_all = balanced_labels(num_classes, num_per_class)
    total = len(labels_all)
    latent_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out_path = Path(out_path)
    shard_dir = Path(shard_dir) if shard_dir is not None else out_path.with_name(out_path.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    if device is None:
        device = next(dit.parameters()).device
    device = torch.device(device)

    meta = {
        "num_classes": num_classes, "num_per_class": num_per_class, "batch_size": batch_size,
        "seed": seed, "latent_shape": list(latent_shape),
        "sampler": {k: _json_safe(v) for k, v in sorted(sampler_kwargs.items()) if k != "progress"},
    }
    meta_path = shard_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise ValueError(
                f"{shard_dir} holds shards of a different run ({old}); this run is {meta}. "
                "Delete the directory or repeat the same settings to resume."
            )
    else:
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")

    num_batches = math.ceil(total / batch_size)
    mine = [b for b in range(num_batches) if b % world_size == rank]
    todo = [b for b in mine if not _shard_ok(shard_dir / f"shard_{b:06d}.npz")]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sampling (rank {rank})",
                   unit="batch")
    was_training = dit.training
    dit.eval()
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else nullcontext())
    try:
        for b in todo:
            lo, hi = b * batch_size, min((b + 1) * batch_size, total)
            noise = torch.stack([
                torch.randn(latent_shape, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                for i in range(lo, hi)
            ]).to(device)
            labels = labels_all[lo:hi].to(device)
            gen = torch.Generator(device=device).manual_seed(sample_seed(seed, total + b))
            with torch.no_grad(), amp:
                latents = sample(dit, noise, labels, generator=gen, **sampler_kwargs)
                images = vae.decode(latents, normalize=True)
            if images.ndim != 4 or images.shape[0] != hi - lo or images.shape[1] != 3:
                raise ValueError(
                    f"vae.decode must return (B, 3, H, W) with B = {hi - lo}, got {tuple(images.shape)}"
                )
            buf = io.BytesIO()
            np.savez(buf, images=to_uint8(images), labels=labels.cpu().numpy(),
                     indices=np.arange(lo, hi))
            atomic_write_bytes(shard_dir / f"shard_{b:06d}.npz", buf.getvalue())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        dit.train(was_training)

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    return _merge(shard_dir, out_path, num_batches, total, keep_shards)


def _merge(shard_dir: Path, out_path: Path, num_batches: int, total: int, keep: bool) -> Path:
    missing = [b for b in range(num_batches) if not _shard_ok(shard_dir / f"shard_{b:06d}.npz")]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {num_batches} shards are missing in {shard_dir} (first: {missing[:5]}); "
            "other ranks have not finished. Re-run them (completed shards are skipped)."
        )
    images = labels = None
    seen = np.zeros(total, dtype=bool)
    for b in range(num_batches):
        with np.load(shard_dir / f"shard_{b:06d}.npz") as f:
            idx, img, lab = f["indices"], f["images"], f["labels"]
        if images is None:
            images = np.empty((total, *img.shape[1:]), dtype=np.uint8)
            labels = np.empty(total, dtype=np.int64)
        if seen[idx].any():
            raise RuntimeError(f"shard {b} repeats image indices; the shard directory is inconsistent")
        seen[idx] = True
        images[idx], labels[idx] = img, lab
    if not seen.all():
        raise RuntimeError(f"{(~seen).sum()} images are missing after merging {shard_dir}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp.npz", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, arr_0=images, arr_1=labels)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not keep:
        for p in shard_dir.glob("shard_*.npz"):
            p.unlink()
        (shard_dir / "meta.json").unlink(missing_ok=True)
        try:
            shard_dir.rmdir()
        except OSError:
            pass
    return out_path
