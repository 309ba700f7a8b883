"""The latents file of ``dmvae encode`` / ``dmvae decode``: one ``.safetensors`` file, readable from
Python with :func:`load_latents` and written with :func:`save_latents`.

Layout::

    tensors   "latents"  float32 (N, C, h, w)    one latent grid per image
              "labels"   int64 (N,)              only for a folder of class sub-folders
    metadata  (JSON text, as safetensors stores strings)
              "normalized"    true / false       latents normalised with the model's statistics
              "latent_mean", "latent_scale"      those statistics (of the model that encoded)
              "image_size"    the crop side S the images were encoded at
              "files"         the N input names, relative to their input folder
              "classes"       the class names, index = label (with "labels")

Every metadata field is optional on reading (a file holding any (N, C, h, w) tensor decodes), but
a field that is present must be valid: errors name the file and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmvae.files import atomic_save_safetensors, read_safetensors

__all__ = ["LatentFile", "load_latents", "save_latents"]


@dataclass
class LatentFile:
    """What :func:`load_latents` read: the latents and the metadata that came with them."""

    latents: torch.Tensor  # (N, C, h, w)
    normalized: bool = True
    files: list[str] | None = None
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    latent_mean: float | None = None
    latent_scale: float | None = None
    image_size: int | None = None


def save_latents(
    path: str | os.PathLike[str],
    latents: torch.Tensor,
    *,
    normalized: bool,
    files: Sequence[str] | None = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    latent_mean: float | None = None,
    latent_scale: float | None = None,
    image_size: int | None = None,
) -> Path:
    """Write ``latents`` (N, C, h, w) and their metadata to ``path`` atomically (float32)."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents must be a (N, C, h, w) tensor, got {tuple(getattr(latents, 'shape', ()))}")
    n = latents.shape[0]
    tensors = {"latents": latents.detach().float().cpu().contiguous()}
    metadata = {"normalized": json.dumps(bool(normalized))}
    for key, value in (("latent_mean", latent_mean), ("latent_scale", latent_scale), ("image_size", image_size)):
        if value is not None:
            metadata[key] = json.dumps(value)
    if files is not None:
        if len(files) != n:
            raise ValueError(f"files must name the {n} latents, got {len(files)} names")
        metadata["files"] = json.dumps([str(f) for f in files])
    if labels is not None:
        tensors["labels"] = torch.as_tensor(labels, dtype=torch.long).cpu()
        if tensors["labels"].shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(tensors['labels'].shape)}")
        if classes is not None:
            metadata["classes"] = json.dumps([str(c) for c in classes])
    return atomic_save_safetensors(tensors, Path(path), metadata=metadata)


def _field(meta: dict[str, str], key: str, path: str, default: Any) -> Any:
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata field {key!r} is not valid JSON ({e.msg} at char {e.pos}): "
                         f"{meta[key][:80]!r}") from None


def load_latents(path: str | os.PathLike[str], *, key: str = "latents") -> LatentFile:
    """Read a latents file (``key`` names the tensor; any (N, C, h, w) tensor is accepted)."""
    from safetensors import safe_open

    where = str(path)
    tensors = read_safetensors(path)
    if key not in tensors:
        raise ValueError(f"{where} has no tensor {key!r}; found {sorted(tensors)}")
    z = tensors[key]
    with safe_open(where, framework="pt") as f:
        meta = f.metadata() or {}
    normalized = _field(meta, "normalized", where, True)
    if not isinstance(normalized, bool):
        raise ValueError(f"{where}: metadata field 'normalized' must be true or false, got {normalized!r}")  # noqa: TRY004 - bad file content
    files = _field(meta, "files", where, None)
    if files is not None and (not isinstance(files, list) or len(files) != len(z)):
        raise ValueError(f"{where}: metadata field 'files' must list {len(z)} names, got "
                         f"{type(files).__name__} of length {len(files) if isinstance(files, list) else '-'}")
    return LatentFile(
        latents=z,
        normalized=normalized,
        files=files,
        labels=tensors.get("labels"),
        classes=_field(meta, "classes", where, None),
        latent_mean=_field(meta, "latent_mean", where, None),
        latent_scale=_field(meta, "latent_scale", where, None),
        image_size=_field(meta, "image_size", where, None),
    )
