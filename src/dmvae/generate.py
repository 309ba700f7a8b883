"""Sample images with a LatentDiT + DMVAE: a batch (:func:`sample_images`) or a class-balanced,
resumable, sharded ADM-evaluator ``.npz`` (:func:`generate_npz`).

Both draw latents with :func:`dmvae.samplers.sample`, decode them with
``vae.decode(latents, normalize=True)`` (DiT latents are *normalised* latents) and convert them
as the reference does (:func:`dmvae.image.to_uint8`: ``clamp(127.5 x + 128, 0, 255)`` truncated,
NHWC). The npz is ``arr_0`` = uint8 images, ``arr_1`` = labels, the layout the ADM evaluator and
torch-fidelity read (:mod:`dmvae.npz`).

Reproducibility and resumption:

* image ``i`` has label ``i % num_classes`` (:func:`balanced_labels`) and its own starting noise,
  drawn from a CPU generator seeded with ``sample_seed(seed, i)`` -- independent of batch size,
  world size and device;
* SDE noise of batch ``b`` comes from a generator on the sampling device seeded with
  ``sample_seed(seed, total + b)`` (a grid of n images is batch 0 of a run of n images);
* every batch is written atomically as a shard (:class:`dmvae.npz.ShardedNpzWriter`); a restart
  skips the shards already on disk, so an interrupted run loses at most one batch and never
  duplicates one. The shards carry a fingerprint of the weights (digests of both models' tensors
  and configs) and of every setting that changes the images; a resume with another model or
  other settings is refused;
* ranks (``torchrun``; read through :mod:`dmvae.dist`) take batches ``b`` with
  ``b % world_size == rank``; rank 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmvae._utils import eval_mode
from dmvae.checks import check_finite, check_int
from dmvae.image import to_uint8_numpy
from dmvae.npz import ShardedNpzWriter

__all__ = [
    "balanced_labels",
    "check_compatible",
    "generate_npz",
    "model_digest",
    "sample_images",
    "sample_seed",
]


def balanced_labels(num_classes: int, num_per_class: int) -> torch.Tensor:
    """``[0, 1, ..., C-1] * num_per_class`` as int64 (every prefix of C labels is one per class)."""
    if num_classes < 1 or num_per_class < 1:
        raise ValueError(f"num_classes and num_per_class must be >= 1, got {num_classes}, {num_per_class}")
    return torch.arange(num_classes, dtype=torch.long).repeat(num_per_class)


def sample_seed(seed: int, index: int) -> int:
    """Deterministic 63-bit seed for item ``index`` of a run seeded with ``seed``."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def model_digest(model: Any) -> str:
    """Content digest of a model: its class, its ``config`` (if any) and every tensor of its
    ``state_dict`` (names, dtypes, shapes, bytes); 32 hex digits of BLAKE2b.

    Reads each tensor once on the host (a few seconds for a 700M-parameter model).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        h.update(json.dumps(to_dict(), sort_keys=True, default=repr).encode())
    state = model.state_dict() if callable(getattr(model, "state_dict", None)) else {}
    for name, t in sorted(state.items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        data = t.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _latent_shape(dit: Any) -> tuple[int, int, int]:
    cfg = getattr(dit, "config", None)
    if cfg is None:
        raise TypeError("dit must expose .config (in_channels, input_size), e.g. a LatentDiT")
    return (int(cfg.in_channels), int(cfg.input_size), int(cfg.input_size))


def check_compatible(dit: Any, vae: Any, labels: torch.Tensor | None = None) -> None:
    """Check, before any sampling step, that ``vae`` can decode ``dit``'s latents and that the
    labels are classes of ``dit``; raise ``ValueError`` naming the mismatch.

    - latent channels: ``dit.config.in_channels`` must equal the VAE's ``config.z_channels``;
    - latent grid: a DMVAE decodes any grid, so a DiT grid other than the VAE's training grid
      (``image_size / patch_size``) gives images of another resolution: a warning;
    - classes: labels in ``[0, num_classes)``; labels for an unconditional DiT are refused.
    """
    c, h, _ = _latent_shape(dit)
    vcfg = getattr(vae, "config", None)
    z = getattr(vcfg, "z_channels", None)
    if z is not None and int(z) != c:
        raise ValueError(
            f"the DiT samples {c}-channel latents (in_channels={c}) but the VAE decodes {z}-channel "
            f"latents (z_channels={z}): this DiT was trained on another autoencoder's latents"
        )
    size, patch = getattr(vcfg, "image_size", None), getattr(vcfg, "patch_size", None)
    if size is not None and patch is not None and int(size) // int(patch) != h:
        warnings.warn(
            f"the DiT samples {h}x{h} latent grids but the VAE was trained on {size // patch}x{size // patch} "
            f"grids ({size}px images): the images will be {h * patch}px",
            stacklevel=2,
        )
    if labels is not None:
        n = int(getattr(dit.config, "num_classes", 0))
        if n == 0:
            raise ValueError("the DiT is unconditional (num_classes=0); it takes no class labels")
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.numel():
            raise ValueError(f"class labels must be in [0, {n}) for this DiT, got {sorted(set(bad.tolist()))[:10]}")


@torch.no_grad()
def _check_sampler_knobs(sampler_kwargs: dict[str, Any]) -> None:
    """The sampler's numeric knobs must be finite numbers (NaN guidance would reach the images)."""
    for knob in ("cfg_scale", "time_shift", "last_step_size", "atol", "rtol"):
        if knob in sampler_kwargs:
            check_finite(knob, sampler_kwargs[knob])
    if isinstance(sampler_kwargs.get("cfg_interval"), (tuple, list)):
        for i, v in enumerate(sampler_kwargs["cfg_interval"]):
            check_finite(f"cfg_interval[{i}]", v)


def sample_images(dit: torch.nn.Module, vae: Any, labels: torch.Tensor | list[int] | None, *, seed: int = 0,
                  first_index: int = 0, sde_seed: int | None = None, num_images: int | None = None,
                  device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                  progress: bool = False, **sampler_kwargs: Any) -> np.ndarray:
    """Sample and decode one batch; uint8 (B, H, W, 3).

    Args:
        dit: the velocity model (e.g. :class:`~dmvae.dit.LatentDiT`); latent shape from
            ``dit.config`` (``in_channels``, ``input_size``). Run in eval mode; its mode is restored.
        vae: anything with ``decode(latents, normalize=True) -> (B, 3, H, W)`` in ~[-1, 1].
        labels: (B,) class ids, or None for an unconditional model (then ``num_images`` = B).
        seed, first_index: image ``j`` starts from noise seeded with
            ``sample_seed(seed, first_index + j)`` (CPU generator, so every device draws the same).
        sde_seed: seed of the SDE noise generator on ``device`` (default
            ``sample_seed(seed, first_index + B)``).
        device: where to sample (default: the DiT's device).
        autocast_dtype: e.g. ``torch.bfloat16`` to sample and decode under autocast.
        **sampler_kwargs: passed to :func:`dmvae.samplers.sample` (``num_steps`` required).
    """
    from dmvae.samplers import sample

    for bad in ("noise", "generator", "return_trajectory"):
        if bad in sampler_kwargs:
            raise ValueError(f"{bad!r} is chosen by sample_images and cannot be passed")
    if "num_steps" not in sampler_kwargs:
        raise ValueError("sample_images needs the sampler's num_steps= (integration steps)")
    _check_sampler_knobs(sampler_kwargs)
    shape = _latent_shape(dit)
    device = torch.device(device if device is not None else next(dit.parameters()).device)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        n = labels.shape[0]
    elif num_images is not None:
        n = int(num_images)
    else:
        raise ValueError("pass labels, or num_images for an unconditional model")
    if n < 1:
        raise ValueError("nothing to sample: 0 images requested")
    noise = torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, first_index + j)))
        for j in range(n)
    ]).to(device)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(
        sde_seed if sde_seed is not None else sample_seed(seed, first_index + n)
    )
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with eval_mode(dit), amp:
        latents = sample(dit, noise, None if labels is None else labels.to(device), generator=gen,
                         progress=progress, **sampler_kwargs)  # fmt: skip
        images = vae.decode(latents, normalize=True)
    if images.ndim != 4 or images.shape[0] != n or images.shape[1] != 3:
        raise ValueError(f"vae.decode must return (B, 3, H, W) with B = {n}, got {tuple(images.shape)}")
    return to_uint8_numpy(images)


def _json_safe(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return repr(v)


def generate_npz(
    dit: torch.nn.Module,
    vae: Any,
    out_path: str | os.PathLike[str],
    *,
    num_per_class: int,
    num_classes: int | None = None,
    batch_size: int = 25,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    shard_dir: str | os.PathLike[str] | None = None,
    keep_shards: bool = False,
    overwrite: bool = True,
    **sampler_kwargs: Any,
) -> Path | None:
    """Generate ``num_classes * num_per_class`` class-balanced images into an ADM-format npz.

    Args:
        dit, vae: see :func:`sample_images`.
        out_path: the final ``.npz``.
        num_per_class, num_classes: label layout (``num_classes`` defaults to ``dit.num_classes``).
        batch_size: images per model batch and per shard (part of the fingerprint).
        seed: base seed; see the module docstring.
        rank, world_size: this process's share of the batches (default: from
            :mod:`dmvae.dist`, i.e. torchrun's process group).
        progress: tqdm bar over this rank's batches.
        device: where to sample (default: the DiT's device).
        autocast_dtype: e.g. ``torch.bfloat16`` to sample and decode under autocast (the release).
        shard_dir: where the per-batch shards go (default ``<out_path>.shards``).
        keep_shards: keep the shard directory after merging.
        overwrite: False refuses an existing ``out_path`` before any work (``FileExistsError``).
        **sampler_kwargs: passed to :func:`dmvae.samplers.sample` (``num_steps`` required).

    Returns:
        the merged ``.npz`` path on rank 0, ``None`` on other ranks.
    """
    from dmvae.dist import barrier, get_rank, get_world_size

    if "num_steps" not in sampler_kwargs:
        raise ValueError("generate_npz needs the sampler's num_steps= (integration steps)")
    for bad in ("noise", "labels", "generator", "return_trajectory"):
        if bad in sampler_kwargs:
            raise ValueError(f"{bad!r} is chosen by generate_npz and cannot be passed")
    _check_sampler_knobs(sampler_kwargs)  # before any file is written
    num_per_class = check_int("num_per_class", num_per_class, 1)
    world_size = check_int("world_size", get_world_size() if world_size is None else world_size, 1)
    rank = check_int("rank", get_rank() if rank is None else rank, 0, world_size - 1)
    batch_size = check_int("batch_size", batch_size, 1)
    out_path = Path(out_path)
    if not overwrite and out_path.exists():
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    latent_shape = _latent_shape(dit)
    num_classes = int(num_classes if num_classes is not None else dit.config.num_classes)
    labels_all = balanced_labels(num_classes, num_per_class)
    check_compatible(dit, vae, labels_all[:num_classes])
    total = len(labels_all)
    device = torch.device(device if device is not None else next(dit.parameters()).device)
    fingerprint = {
        "num_classes": num_classes, "num_per_class": num_per_class, "seed": int(seed),
        "latent_shape": list(latent_shape), "dit": model_digest(dit), "vae": model_digest(vae),
        "autocast": None if autocast_dtype is None else str(autocast_dtype),
        "sampler": {k: _json_safe(v) for k, v in sorted(sampler_kwargs.items()) if k != "progress"},
    }  # fmt: skip
    writer = ShardedNpzWriter(out_path, total=total, batch_size=batch_size, fingerprint=fingerprint,
                              shard_dir=shard_dir).open()  # fmt: skip
    mine = list(range(rank, writer.num_batches, world_size))
    todo = writer.pending(mine)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sampling (rank {rank})", unit="batch")
    try:
        for b in todo:
            lo, hi = b * batch_size, min((b + 1) * batch_size, total)
            images = sample_images(dit, vae, labels_all[lo:hi], seed=seed, first_index=lo,
                                   sde_seed=sample_seed(seed, total + b), device=device,
                                   autocast_dtype=autocast_dtype, **sampler_kwargs)  # fmt: skip
            writer.write(b, images, labels_all[lo:hi].numpy())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    barrier()
    if rank != 0:
        return None
    return writer.merge(keep_shards=keep_shards)
