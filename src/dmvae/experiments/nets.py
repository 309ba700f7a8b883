"""The networks Table 1 trains besides the autoencoders and LatentDiTs.

* :class:`FeatureClassifier`: the *independent* evaluation classifier (a small CNN, a different
  architecture from the autoencoder's ViT encoder), trained on the training split and frozen. Its
  penultimate layer (``features``: the ReLU output of the first fully connected layer) is the
  feature space of rFD / gFD, the "FID for MNIST" practice; its logits give the sample accuracy.
* :func:`pretrain_ssl_encoder`: the stand-in for DINOv2, a self-supervised encoder trained here
  (SimCLR: two augmented views, NT-Xent on a projection head of the mean patch token) on the whole
  pretraining set, with SimCLR's own augmentations (:func:`ssl_views`: random resized crop,
  horizontal flip, brightness / contrast jitter, cutout).
* :func:`pretrain_supervised_encoder`: the stand-in for the paper's supervised ResNet row, the
  same encoder trained as a classifier (mean patch token -> linear head, cross-entropy).

Both encoders are :class:`dmvae.encoders.DINOv2Encoder` modules taken from a ``DMVAE`` of the
experiment's config (``vae.encoder``), so their weights load into the autoencoder unchanged.
The classifier and the supervised encoder use the library's :class:`dmvae.gan.DiffAugment`
(translation, cutout; colour for the encoder).

Nothing here seeds the global RNG: every model is initialised inside :func:`seeded`
(``torch.random.fork_rng`` + a seed), so a caller's random state is left as it was.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmvae.gan import DiffAugment

__all__ = [
    "FeatureClassifier",
    "classifier_outputs",
    "pretrain_ssl_encoder",
    "pretrain_supervised_encoder",
    "seeded",
    "ssl_views",
    "train_classifier",
]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU RNG seeded by ``seed`` and restore the caller's state after it
    (model initialisation, label dropout and anything else that draws from the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
        model = FeatureClassifier(num_classes, images.shape[-1], feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    aug = DiffAugment(translation=0.125, cutout=0.25, color=False)
    draw = _batches(images.shape[0], batch_size, g)
    for _ in range(steps):
        idx = draw()
        logits, _ = model(aug(images[idx], g))
        loss = F.cross_entropy(logits, labels[idx])
        optimizer_step(opt, loss)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_outputs(model: FeatureClassifier, images: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """(logits (N, K), features (N, F)) of images (N, 3, S, S), in chunks."""
    outs = [model(part) for part in images.split(chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """5 % linear warm-up, then cosine decay to 0 over ``steps`` (every network the experiment trains)."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))


def optimizer_step(opt: torch.optim.Optimizer, loss: Tensor,
                   sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """One training step: clear the gradients, backpropagate ``loss``, step ``opt`` (and ``sched``)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


def _pretraining(encoder: nn.Module, head: nn.Module, n: int, batch_size: int, lr: float, steps: int,
                 generator: torch.Generator) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR,
                                                      Callable[[], Tensor]]:
    """AdamW over the encoder and its head with the cosine schedule, a batch-index drawer over ``n``
    images, and the encoder switched to training (both encoder pre-trainings start this way)."""
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
    encoder.train().requires_grad_(True)
    return opt, cosine_schedule(opt, steps), _batches(n, batch_size, generator)


def _pooled(encoder: nn.Module, x: Tensor) -> Tensor:
    return encoder(x).mean(dim=1)  # (B, N, D) patch tokens -> (B, D)


def ssl_views(x: Tensor, g: torch.Generator, *, min_scale: float = 0.35, flip: bool = True,
              jitter: float = 0.4, cutout: float = 0.25) -> Tensor:
    """One SimCLR view of each image (B, 3, S, S) in [-1, 1]: a random crop of ``min_scale``..1 of
    the area (aspect 3/4..4/3) resized back to S (bilinear), a horizontal flip with probability
    1/2, brightness and contrast scaled by 1 +- ``jitter``, and a zeroed square of side ``cutout`` S."""
    b = x.shape[0]
    u = torch.rand(b, 6, generator=g)
    area = min_scale + (1 - min_scale) * u[:, 0]
    log_r = (u[:, 1] - 0.5) * 2 * math.log(4 / 3)
    sx = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    sy = (area / log_r.exp()).sqrt().clamp(max=1.0)
    tx, ty = (1 - sx) * (2 * u[:, 2] - 1), (1 - sy) * (2 * u[:, 3] - 1)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * sign, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    j = (torch.rand(b, 2, 1, 1, 1, generator=g) * 2 - 1) * jitter
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * (1 + j[:, 0]) + mean * (1 + j[:, 1])
    if cutout > 0:
        aug = DiffAugment(translation=0.0, cutout=cutout, color=False)
        out = aug(out, g)
    return out.clamp(-1, 1)


def pretrain_ssl_encoder(
    encoder: nn.Module, images: Tensor, *, steps: int, batch_size: int = 128, lr: float = 1e-3,
    temperature: float = 0.2, seed: int = 0, min_scale: float = 0.35,
) -> nn.Module:
    """SimCLR on the training images; trains ``encoder`` in place and returns it frozen (eval).

    Loss (NT-Xent): for the 2B projected, L2-normalised views u_i, with i+ the other view of i,
    ``L = mean_i -log( exp(u_i . u_i+ / tau) / sum_{j != i} exp(u_i . u_j / tau) )``.
    The labels are never used.
    """
    g = torch.Generator().manual_seed(seed)
    dim = encoder.embed_dim
    with seeded(seed):
        head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 64))
    opt, sched, draw = _pretraining(encoder, head, images.shape[0], batch_size, lr, steps, g)
    for _ in range(steps):
        x = images[draw()]
        b = x.shape[0]
        views = torch.cat([ssl_views(x, g, min_scale=min_scale), ssl_views(x, g, min_scale=min_scale)])
        u = F.normalize(head(_pooled(encoder, views)), dim=1)  # (2B, 64)
        sim = u @ u.T / temperature  # (2B, 2B)
        sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])  # index of the other view
        loss = F.cross_entropy(sim, target)
        optimizer_step(opt, loss, sched)
    return encoder.eval().requires_grad_(False)


def pretrain_supervised_encoder(
    encoder: nn.Module, images: Tensor, labels: Tensor, num_classes: int, *, steps: int,
    batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
) -> nn.Module:
    """Train ``encoder`` + a linear head on the mean patch token as a classifier (cross-entropy,
    same augmentations as SSL); returns the encoder frozen (eval), the head is discarded."""
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
        head = nn.Linear(encoder.embed_dim, num_classes)
    opt, sched, draw = _pretraining(encoder, head, images.shape[0], batch_size, lr, steps, g)
    for _ in range(steps):
        idx = draw()
        loss = F.cross_entropy(head(_pooled(encoder, ssl_views(images[idx], g))), labels[idx])
        optimizer_step(opt, loss, sched)
    return encoder.eval().requires_grad_(False)
