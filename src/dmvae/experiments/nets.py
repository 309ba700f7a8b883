"""The networks Table 1 trains besides the autoencoders and LatentDiTs.

* :class:`FeatureClassifier`: the *independent* evaluation classifier (a small CNN, a different
  architecture from the autoencoder's ViT encoder), trained on the training split and frozen. Its
  penultimate layer (``features``: the ReLU output of the first fully connected layer) is the
  feature space of rFD / gFD, the "FID for MNIST" practice; its logits give the sample accuracy.
* :func:`pretrain_ssl_encoder`: the stand-in for DINOv2, a self-supervised encoder trained here
  (SimCLR: two augmented views, NT-Xent on a projection head of the mean patch token).
* :func:`pretrain_supervised_encoder`: the stand-in for the paper's supervised ResNet row, the
  same encoder trained as a classifier (mean patch token -> linear head, cross-entropy).

Both encoders are :class:`dmvae.encoders.DINOv2Encoder` modules taken from a ``DMVAE`` of the
experiment's config (``vae.encoder``), so their weights load into the autoencoder unchanged.
Augmentations are the library's :class:`dmvae.training.DiffAugment` (colour, translation, cutout).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmvae.training import DiffAugment

__all__ = [
    "FeatureClassifier",
    "train_classifier",
    "classifier_outputs",
    "pretrain_ssl_encoder",
    "pretrain_supervised_encoder",
]


class FeatureClassifier(nn.Module):
    """CNN for (B, 3, S, S) images in [-1, 1] (S a multiple of 4).

    conv3x3(3->32) -> ReLU -> conv3x3/2(32->64) -> ReLU -> conv3x3/2(64->64) -> ReLU -> flatten
    -> Linear(64 (S/4)^2 -> ``feature_dim``) -> ReLU  [= ``features``, the gFD layer]
    -> Linear(``feature_dim`` -> K)                   [= logits]
    """

    def __init__(self, num_classes: int, image_size: int, feature_dim: int = 64) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"FeatureClassifier needs an image size divisible by 4, got {image_size}")
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (logits (B, K), penultimate features (B, feature_dim))."""
        feats = self.trunk(x)  # (B, F)
        return self.head(feats), feats


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Callable[[], Tensor]:
    return lambda: torch.randint(n, (batch_size,), generator=generator)


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, *, steps: int, batch_size: int = 128,
    lr: float = 1e-3, feature_dim: int = 64, seed: int = 0,
) -> FeatureClassifier:
    """Train :class:`FeatureClassifier` (AdamW, translation + cutout augmentation) and return it
    frozen, in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = FeatureClassifier(num_classes, images.shape[-1], feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    aug = DiffAugment(translation=0.125, cutout=0.25, color=False)
    draw = _batches(images.shape[0], batch_size, g)
    for _ in range(steps):
        idx = draw()
        logits, _ = model(aug(images[idx], g))
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_outputs(model: FeatureClassifier, images: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """(logits (N, K), features (N, F)) of images (N, 3, S, S), in chunks."""
    outs = [model(part) for part in images.split(chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _pooled(encoder: nn.Module, x: Tensor) -> Tensor:
    return encoder(x).mean(dim=1)  # (B, N, D) patch tokens -> (B, D)


def _views(aug: DiffAugment, x: Tensor, g: torch.Generator) -> Tensor:
    return aug(x, g).clamp(-1, 1)


def pretrain_ssl_encoder(
    encoder: nn.Module, images: Tensor, *, steps: int, batch_size: int = 128, lr: float = 1e-3,
    temperature: float = 0.2, seed: int = 0,
) -> nn.Module:
    """SimCLR on the training images; trains ``encoder`` in place and returns it frozen (eval).

    Loss (NT-Xent): for the 2B projected, L2-normalised views u_i, with i+ the other view of i,
    ``L = mean_i -log( exp(u_i . u_i+ / tau) / sum_{j != i} exp(u_i . u_j / tau) )``.
    The labels are never used.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dim = encoder.embed_dim
    head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 64))
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    aug = DiffAugment(translation=0.125, cutout=0.25, color=True)
    draw = _batches(images.shape[0], batch_size, g)
    encoder.train().requires_grad_(True)
    for _ in range(steps):
        x = images[draw()]
        b = x.shape[0]
        views = torch.cat([_views(aug, x, g), _views(aug, x, g)])  # (2B, 3, S, S)
        u = F.normalize(head(_pooled(encoder, views)), dim=1)  # (2B, 64)
        sim = u @ u.T / temperature  # (2B, 2B)
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])  # index of the other view
        loss = F.cross_entropy(sim, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return encoder.eval().requires_grad_(False)


def pretrain_supervised_encoder(
    encoder: nn.Module, images: Tensor, labels: Tensor, num_classes: int, *, steps: int,
    batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
) -> nn.Module:
    """Train ``encoder`` + a linear head on the mean patch token as a classifier (cross-entropy,
    same augmentations as SSL); returns the encoder frozen (eval), the head is discarded."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(encoder.embed_dim, num_classes)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    aug = DiffAugment(translation=0.125, cutout=0.25, color=True)
    draw = _batches(images.shape[0], batch_size, g)
    encoder.train().requires_grad_(True)
    for _ in range(steps):
        idx = draw()
        loss = F.cross_entropy(head(_pooled(encoder, _views(aug, images[idx], g))), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return encoder.eval().requires_grad_(False)
