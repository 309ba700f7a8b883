"""The DINOv2 ViT encoder of DMVAE, a thin wrapper around a timm Vision Transformer.

Pipeline (upstream digest §1 "Encoder", §8 item 3), for images x in [-1, 1]:

    x -> x * 0.5 + 0.5                 (``de_scale``: back to [0, 1])
      -> (x - mean_imagenet) / std_imagenet   (``scale``)
      -> timm ``forward_features``     (patch embed, pos-embed, blocks, final LayerNorm)
      -> drop the ``num_prefix_tokens`` prefix tokens (the CLS token for DINOv2)
      -> (B, N, D) patch tokens, row-major over the (H/p, W/p) grid.

The two normalisation steps are modules with persistent ``mean``/``std`` buffers of shape
[1, 3, 1, 1] because the reference checkpoints store them (``encoder.de_scale.mean`` ...).

The backbone is always built with ``pretrained=False`` (building never touches the network);
:func:`load_pretrained_backbone` is the explicit step that initialises it from DINOv2 weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Normalize",
    "Denormalize",
    "DINOv2Encoder",
    "create_vit_backbone",
    "load_pretrained_backbone",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# kwargs that DMVAE sets itself and that must not come from ``encoder_kwargs``
RESERVED_TIMM_KWARGS = frozenset(
    {"pretrained", "patch_size", "img_size", "num_classes", "dynamic_img_size", "pretrained_cfg_overlay"}
)


class _ChannelAffine(nn.Module):
    """Holds per-channel ``mean`` and ``std`` buffers of shape [1, C, 1, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


class Normalize(_ChannelAffine):
    """``(x - mean) / std``."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Denormalize(_ChannelAffine):
    """``x * std + mean`` (the inverse of :class:`Normalize`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean


def _timm_kwargs(patch_size: int, img_size: int, encoder_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    encoder_kwargs = dict(encoder_kwargs or {})
    clash = sorted(RESERVED_TIMM_KWARGS & set(encoder_kwargs))
    if clash:
        raise ValueError(
            f"encoder_kwargs may not set {clash}: DMVAE sets them itself (patch_size / image_size "
            "come from the config fields of the same name)"
        )
    # dynamic_img_size: the pos-embed is stored for the training grid (img_size / patch_size)^2
    # and bicubically resampled on the fly for other input sizes; at the training size it is
    # used as is (bitwise identical to the reference, which builds with dynamic_img_size=False).
    return dict(
        patch_size=patch_size, img_size=img_size, num_classes=0, dynamic_img_size=True, **encoder_kwargs
    )


def create_vit_backbone(
    name: str, *, patch_size: int, img_size: int, encoder_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Build the timm ViT ``name`` without weights (``pretrained=False``, no network access)."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, **_timm_kwargs(patch_size, img_size, encoder_kwargs))
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(
                f"unknown timm encoder {name!r}; expected a timm ViT name such as "
                "'vit_large_patch14_dinov2.lvd142m' (see timm.list_models('*dinov2*'))"
            ) from e
        raise


def load_pretrained_backbone(
    source: str | os.PathLike[str],
    *,
    architecture: str,
    patch_size: int,
    img_size: int,
    encoder_kwargs: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """State dict of a pretrained timm ViT, resampled to ``patch_size`` / ``img_size``.

    ``source`` is either a local weights file (``.safetensors`` / ``.pth`` / ``.bin`` holding the
    ViT's state dict at its native resolution, e.g. patch 14 / 518 px for DINOv2) or a timm model
    name (``'vit_large_patch14_dinov2.lvd142m'`` or ``'hf-hub:timm/...'``), which timm resolves
    through the Hugging Face cache (honouring ``HF_HUB_OFFLINE``). timm's checkpoint filter
    resamples the patch-embedding kernel (e.g. 14x14 -> 16x16) and the absolute pos-embed
    (bicubic, antialiased) to the target grid, exactly as the reference's
    ``create_model(..., pretrained=True, patch_size=16, img_size=256)`` does.

    Local files are loaded with ``architecture`` (the timm model name of the config) as the
    model definition; timm reads them with ``weights_only=True``.
    """
    import timm

    kwargs = _timm_kwargs(patch_size, img_size, encoder_kwargs)
    src = str(source)
    path = Path(os.path.expanduser(src))
    try:
        if path.is_file():
            model = timm.create_model(
                architecture, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
            )
        elif path.exists():
            raise ValueError(f"pretrained encoder source {path} is a directory; expected a weights file")
        elif src.startswith(("/", ".", "~")) or path.suffix in {".safetensors", ".pth", ".pt", ".bin"}:
            raise FileNotFoundError(f"pretrained encoder weights file not found: {path}")
        else:  # a timm model name or 'hf-hub:owner/name'
            try:
                model = timm.create_model(src, pretrained=True, **kwargs)
            except OSError as e:  # offline and not cached, network or auth failure
                offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
                raise FileNotFoundError(
                    f"could not fetch pretrained weights for {src!r} through timm"
                    f"{' (HF_HUB_OFFLINE is set and they are not in the cache)' if offline else ''}: "
                    f"{e}. Download them once, or pass a local weights file."
                ) from e
    except RuntimeError as e:  # timm's strict load: missing/unexpected keys, size mismatches
        from dmvae.files import CheckpointError

        raise CheckpointError(
            f"could not initialise the {architecture!r} encoder (patch {patch_size}, {img_size} px, "
            f"kwargs {encoder_kwargs or {}}) from {src!r}: {e}"
        ) from e
    return {k: v.detach() for k, v in model.state_dict().items()}


class DINOv2Encoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> patch tokens (B, (H/p)*(W/p), D).

    Args:
        name: timm model name (the architecture; weights are never downloaded here).
        patch_size: ViT patch size (16 in DMVAE: the 14-px DINOv2 kernel resampled).
        img_size: training resolution; fixes the stored pos-embed grid ((img_size/p)^2 + prefix).
        encoder_kwargs: extra timm kwargs (e.g. ``embed_dim``, ``depth``, ``num_heads``).
    """

    def __init__(
        self, name: str, *, patch_size: int, img_size: int, encoder_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.de_scale = Denormalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.scale = Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.model = create_vit_backbone(
            name, patch_size=patch_size, img_size=img_size, encoder_kwargs=encoder_kwargs
        )
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 1))
        self.embed_dim = int(self.model.embed_dim)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 3, H, W) in [-1, 1]
        x = self.scale(self.de_scale(x))  # (B, 3, H, W), ImageNet-normalised
        h = self.model.forward_features(x)  # (B, prefix + N, D), final norm included
        return h[:, self.num_prefix_tokens :]  # (B, N, D), row-major patches
