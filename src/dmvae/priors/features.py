"""Data-derived priors built from a dataset (paper Table 1: DINO, ResNet, SubDINO, Difftraj).

* :class:`FeaturePrior` -- features of a frozen backbone (a timm DINOv2 ViT for the SSL prior, a
  supervised ResNet for the supervised one) over a dataset, mapped to the latent shape by a
  projector (the paper reduces every prior to ~32 dims with a reconstruction-trained projector --
  for DINO the stage-1 frozen encoder + MLP bottleneck, App. D), optionally restricted to a subset
  of classes (the paper's SubDINO: 10 ImageNet classes).
* :class:`DiffusionNoisePrior` -- "Difftraj": latents z of a given autoencoder moved to t = 0.5
  along the path, z_t = t z + (1 - t) eps (t = 0.5 is the same in the paper's reversed time).

Both build a bank once and are :class:`~dmvae.priors.SamplesPrior` s afterwards (exact empirical
velocity, memory-bounded). The paper turns each into a learned teacher by fitting a LatentDiT on
the bank: ``fit_reference_model(dit, prior.samples, ...)`` then ``LearnedPrior(dit)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dmvae._utils import eval_mode
from dmvae.priors.base import register_prior
from dmvae.priors.samples import SamplesPrior

__all__ = ["DiffusionNoisePrior", "FeaturePrior", "backbone_features"]


def _iter_batches(data: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(data, torch.Tensor):
        for s in range(0, data.shape[0], batch_size):
            yield data[s : s + batch_size], None
        return
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        xs, ys = data
        for s in range(0, xs.shape[0], batch_size):
            yield xs[s : s + batch_size], ys[s : s + batch_size]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an image tensor, an (images, labels) tuple or an iterable of batches, got {type(data).__name__}"
        )
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (torch.as_tensor(batch[1]) if len(batch) > 1 else None)
        else:
            yield batch, None


def backbone_features(backbone: nn.Module | Callable, images: torch.Tensor, *, drop_prefix_tokens: bool = True) -> torch.Tensor:
    """Features of a (timm) backbone: ``forward_features`` when available, prefix tokens dropped.

    ViTs give (B, N, D) patch tokens (the CLS / register tokens removed, as the DMVAE encoder does);
    CNNs give (B, C, H, W) maps; any other callable is applied as is.
    """
    fwd = getattr(backbone, "forward_features", None)
    out = fwd(images) if callable(fwd) else backbone(images)
    if isinstance(out, (tuple, list)):
        out = out[0]
    n_prefix = getattr(backbone, "num_prefix_tokens", 0) if drop_prefix_tokens else 0
    if out.ndim == 3 and n_prefix:
        out = out[:, n_prefix:]
    return out


@torch.no_grad()
def _build_bank(
    fn: Callable[[torch.Tensor], torch.Tensor],
    modules: Sequence[Any],
    data: Any,
    *,
    classes: Sequence[int] | None,
    max_samples: int | None,
    batch_size: int,
    device: torch.device | str | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    keep = None if classes is None else torch.as_tensor(list(classes)).long()
    feats, labels, n = [], [], 0
    it = _iter_batches(data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="building prior bank", leave=False)
    with eval_mode(*modules):
        for x, y in it:
            if keep is not None:
                if y is None:
                    raise ValueError("classes= needs labelled data: (images, labels) batches")
                mask = torch.isin(y.long().cpu(), keep)
                if not mask.any():
                    continue
                x, y = x[mask.to(x.device)], y[mask.to(y.device)]
            if device is not None:
                x = x.to(device)
            f = fn(x).float().cpu()
            feats.append(f)
            if y is not None:
                labels.append(y.long().cpu())
            n += f.shape[0]
            if max_samples is not None and n >= max_samples:
                break
    if not feats:
        raise ValueError("no samples were collected (empty data or no sample of the requested classes)")
    bank = torch.cat(feats)[:max_samples]
    lab = torch.cat(labels)[: bank.shape[0]] if labels and len(labels) == len(feats) else None
    return bank, lab


@register_prior("features")
class FeaturePrior(SamplesPrior):
    """Frozen-backbone features over a dataset, projected to the latent shape.

    Args:
        backbone: a frozen feature extractor, e.g. ``timm.create_model("vit_large_patch14_dinov2",
            pretrained=True, ...)`` (SSL prior) or ``timm.create_model("resnet34", ...)``
            (supervised prior). ``None`` when ``projector`` maps images to latents directly (e.g.
            ``DMVAE.encode`` -- frozen encoder + bottleneck, the paper's DINO reference).
        data: an image tensor (N, 3, H, W), an ``(images, labels)`` tuple or an iterable/DataLoader
            of ``images`` or ``(images, labels)`` batches, in the backbone's expected range.
        projector: maps backbone features to latents (B, *shape); ``None`` keeps the features.
        classes: keep only samples with these labels (the paper's SubDINO uses 10 classes).
        class_conditional: keep the labels so that the prior is class-conditional.
        max_samples, batch_size, device, progress: bank building.
        bandwidth, chunk_size: as :class:`SamplesPrior`.
    """

    def __init__(
        self,
        backbone: nn.Module | Callable | None,
        data: Any,
        *,
        projector: nn.Module | Callable | None = None,
        classes: Sequence[int] | None = None,
        class_conditional: bool = False,
        max_samples: int | None = None,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        drop_prefix_tokens: bool = True,
        bandwidth: float = 0.0,
        chunk_size: int = 4096,
        progress: bool = False,
    ) -> None:
        if backbone is None and projector is None:
            raise ValueError("give a backbone, a projector, or both")

        def fn(x: torch.Tensor) -> torch.Tensor:
            h = backbone_features(backbone, x, drop_prefix_tokens=drop_prefix_tokens) if backbone is not None else x
            return projector(h) if projector is not None else h

        bank, labels = _build_bank(
            fn, [backbone, projector], data, classes=classes, max_samples=max_samples,
            batch_size=batch_size, device=device, progress=progress,
        )
        if class_conditional and labels is None:
            raise ValueError("class_conditional=True needs labelled data")
        super().__init__(
            bank, labels if class_conditional else None, bandwidth=bandwidth, chunk_size=chunk_size
        )
        self.classes = None if classes is None else [int(c) for c in classes]


@register_prior("diffusion_noise")
class DiffusionNoisePrior(SamplesPrior):
    """"Difftraj": noisy latents ``z_t = t z + (1 - t) eps`` of an autoencoder, z = encode(x).

    The distribution of z_t is exactly the mixture (1/N) sum_i N(t z_i, (1 - t)^2 I), so this is a
    :class:`SamplesPrior` over the bank ``t z_i`` with kernel width ``1 - t``: sampling draws fresh
    noise every call and the velocity is exact. ``t = 0.5`` is the paper's setting (the same in
    both time conventions).

    Args:
        autoencoder: an object with ``encode(images)`` (e.g. ``DMVAE``) or a callable
            images -> latents (B, *shape).
        data: images as for :class:`FeaturePrior`.
        t: path time of the noisy state (library convention, 1 = data), in (0, 1).
    """

    def __init__(
        self,
        autoencoder: nn.Module | Callable,
        data: Any,
        *,
        t: float = 0.5,
        classes: Sequence[int] | None = None,
        max_samples: int | None = None,
        batch_size: int = 32,
        device: torch.device | str | None = None,
        chunk_size: int = 4096,
        progress: bool = False,
    ) -> None:
        if not 0.0 < t < 1.0:
            raise ValueError(f"t must be in (0, 1), got {t}")
        encode = getattr(autoencoder, "encode", None)
        fn = encode if callable(encode) else autoencoder
        if not callable(fn):
            raise TypeError("autoencoder must have an encode() method or be callable")
        bank, _ = _build_bank(
            fn, [autoencoder], data, classes=classes, max_samples=max_samples,
            batch_size=batch_size, device=device, progress=progress,
        )
        super().__init__(t * bank, bandwidth=1.0 - t, chunk_size=chunk_size)
        self.t = float(t)
