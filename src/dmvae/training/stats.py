"""Latent normalisation statistics: ``z_n = (z - latent_mean) * latent_scale``, scale ~ 1 / std.

Two estimators:

- ``"exact"`` (default): the mean and ``1 / std`` of *all* latent entries of the data set (std with
  Bessel's correction, like ``torch.std``). Accumulated per batch in float64 with Chan's parallel
  merge of (count, mean, M2), so it does not depend on the batch size, the order, or the number of
  processes.
- ``"reference"``: what the DMVAE reference reports (and what its released 0.0685 / 0.1763 are):
  the mean over batches of the batch mean, and the mean over batches of ``1 / (batch std + 1e-8)``.
  It depends on the batch size (``E[1/std] >= 1/E[std]``) and weights a short last batch like a full
  one; use it only to reproduce the reference's numbers.

Under ``torch.distributed`` the statistics of all processes are combined in :meth:`compute`.

    stats = LatentStats()
    for x in loader:
        stats.update(model.encode(x))
    mean, scale = stats.compute()
    stats.apply_to(model)          # model.config.latent_mean / latent_scale
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from dmvae.training.distributed import get_world_size, is_distributed

__all__ = ["LatentStats"]

Estimator = Literal["exact", "reference"]


class LatentStats:
    """Running estimate of ``latent_mean`` / ``latent_scale`` (scalars over all entries).

    Args:
        estimator: "exact" (default) or "reference" (see module docstring).
        eps: the reference's ``1 / (std + eps)`` epsilon (only used by "reference").
    """

    def __init__(self, estimator: Estimator = "exact", eps: float = 1e-8) -> None:
        if estimator not in ("exact", "reference"):
            raise ValueError(f"estimator must be 'exact' or 'reference', got {estimator!r}")
        self.estimator = estimator
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        # exact: running count / mean / sum of squared deviations (float64)
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0
        # reference: sums of per-batch mean and per-batch inverse std, number of batches
        self._sum_batch_mean = 0.0
        self._sum_batch_inv_std = 0.0
        self.num_batches = 0

    @torch.no_grad()
    def update(self, latents: Tensor) -> None:
        """Add one batch of latents (any shape; every entry counts)."""
        z = latents.detach().to(torch.float64).flatten()
        n = z.numel()
        if n == 0:
            return
        mean = z.mean().item()
        m2 = ((z - mean) ** 2).sum().item()
        self._merge(n, mean, m2)
        if n < 2:
            std = float("nan")
        else:
            std = math.sqrt(m2 / (n - 1))
        self._sum_batch_mean += mean
        self._sum_batch_inv_std += 1.0 / (std + self.eps)
        self.num_batches += 1

    def _merge(self, n: int, mean: float, m2: float) -> None:
        # Chan et al. parallel variance: combine (count, mean, M2) of two parts exactly.
        tot = self.count + n
        delta = mean - self._mean
        self._mean += delta * n / tot
        self._m2 += m2 + delta * delta * self.count * n / tot
        self.count = tot

    def compute(self, sync: bool = True) -> tuple[float, float]:
        """``(latent_mean, latent_scale)``; combines all processes if ``sync`` and distributed."""
        count, mean, m2 = self.count, self._mean, self._m2
        s_mean, s_inv, nb = self._sum_batch_mean, self._sum_batch_inv_std, self.num_batches
        if sync and is_distributed() and get_world_size() > 1:
            import torch.distributed as dist

            local = _to_backend_device(torch.tensor([float(count), mean, m2], dtype=torch.float64))
            parts = [torch.zeros_like(local) for _ in range(get_world_size())]
            dist.all_gather(parts, local)
            count, mean, m2 = 0, 0.0, 0.0
            for p in parts:
                n_i, mean_i, m2_i = int(p[0].item()), p[1].item(), p[2].item()
                if n_i == 0:
                    continue
                tot = count + n_i
                delta = mean_i - mean
                mean += delta * n_i / tot
                m2 += m2_i + delta * delta * count * n_i / tot
                count = tot
            ref = _to_backend_device(torch.tensor([s_mean, s_inv, float(nb)], dtype=torch.float64))
            dist.all_reduce(ref)
            s_mean, s_inv, nb = ref[0].item(), ref[1].item(), int(ref[2].item())
        if count < 2:
            raise ValueError(f"LatentStats needs at least 2 latent entries, got {count}; call update() first")
        if self.estimator == "exact":
            std = math.sqrt(m2 / (count - 1))
            if std == 0.0:
                raise ValueError("latents have zero variance; latent_scale = 1/std is undefined")
            return mean, 1.0 / std
        return s_mean / nb, s_inv / nb

    @property
    def mean(self) -> float:
        return self.compute()[0]

    @property
    def scale(self) -> float:
        return self.compute()[1]

    def apply_to(self, model: Any, sync: bool = True) -> tuple[float, float]:
        """Write the statistics into ``model.config.latent_mean`` / ``latent_scale`` and return them.

        A frozen dataclass config is replaced by a copy. Raises if the config lacks those fields.
        """
        mean, scale = self.compute(sync=sync)
        target = getattr(model, "module", model)  # DDP
        config = getattr(target, "config", None)
        if config is None or not all(hasattr(config, f) for f in ("latent_mean", "latent_scale")):
            raise AttributeError(
                f"{type(target).__name__} has no config.latent_mean / config.latent_scale to write to "
                f"(config: {type(config).__name__})"
            )
        try:
            config.latent_mean = mean
            config.latent_scale = scale
        except dataclasses.FrozenInstanceError:
            target.config = dataclasses.replace(config, latent_mean=mean, latent_scale=scale)
        hook = getattr(target, "_on_latent_stats_changed", None)
        if callable(hook):  # lets a model refresh buffers derived from the config
            hook()
        return mean, scale

    @classmethod
    def from_loader(
        cls,
        encode: Callable[[Any], Tensor],
        loader: Iterable[Any],
        *,
        estimator: Estimator = "exact",
        max_batches: int | None = None,
        progress: bool = False,
    ) -> LatentStats:
        """Run ``encode(batch)`` over ``loader`` (up to ``max_batches``) under ``no_grad``.

        ``encode`` receives the loader's item as is (e.g. ``lambda b: model.encode(b[0].to(dev))``).
        """
        stats = cls(estimator=estimator)
        it: Iterable[Any] = loader
        if progress:
            from tqdm.auto import tqdm

            from dmvae.training.distributed import is_main_process

            it = tqdm(loader, desc="latent stats", total=max_batches, disable=not is_main_process())
        with torch.no_grad():
            for i, batch in enumerate(it):
                if max_batches is not None and i >= max_batches:
                    break
                stats.update(encode(batch))
        return stats

    def __repr__(self) -> str:
        return f"LatentStats(estimator={self.estimator!r}, count={self.count}, batches={self.num_batches})"


def _to_backend_device(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return t.cuda()
    return t
