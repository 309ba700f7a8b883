"""Latent statistics: the one estimator behind ``latent_mean`` / ``latent_scale`` and the latent
report of the evaluation.

Normalised latents are ``z_n = (z - latent_mean) * latent_scale`` with ``scale ~ 1 / std``.
:class:`LatentStats` accumulates, per channel ``c``, the count ``n``, mean ``m_c`` and sum of
squared deviations ``M2_c`` in float64 and merges batches (and processes) with Chan et al.'s
parallel update

    n = n_a + n_b,   d = m_b - m_a,   m = m_a + d n_b / n,   M2 = M2_a + M2_b + d^2 n_a n_b / n,

so no number depends on the batch size, the order, or the number of processes. The scalars over
all entries follow from the channel parts the same way. Two estimators of the scalars:

- ``"exact"`` (default): mean and ``1 / std`` of *all* latent entries (std with Bessel's
  correction, like ``torch.std``).
- ``"reference"``: what the DMVAE reference reports (and what its released 0.0685 / 0.1763 are):
  the mean over batches of the batch mean, and the mean over batches of ``1 / (batch std + 1e-8)``.
  It depends on the batch size (``E[1/std] >= 1/E[std]``) and weights a short last batch like a
  full one; use it only to reproduce the reference's numbers.

Channels: (B, C, H, W) grids have channel axis 1, (B, N, C) token sequences and (B, D) vectors the
last axis; a 1-d tensor is one channel. Under ``torch.distributed`` the processes are combined in
:meth:`LatentStats.compute` / :meth:`LatentStats.summary` (``sync=True``) or, in place, by
:meth:`LatentStats.all_reduce`.

    stats = LatentStats()
    for x in loader:
        stats.update(model.encode(x))
    mean, scale = stats.compute()
    stats.apply_to(model)          # model.config.latent_mean / latent_scale
    stats.summary()                # per-channel means/stds for a report

:class:`LatentChannelStats` (the evaluation's historical name) is the same estimator whose
``compute()`` returns that report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["LatentChannelStats", "LatentStats"]

Estimator = Literal["exact", "reference"]


def _channels_first(z: Tensor) -> Tensor:
    """Any latent tensor -> float64 (C, N) with the channel axis first (see the module docstring)."""
    z = z.detach().to(torch.float64)
    if z.dim() >= 4:
        return z.transpose(0, 1).reshape(z.shape[1], -1)  # (C, B*H*W...)
    if z.dim() in (2, 3):
        return z.reshape(-1, z.shape[-1]).T  # (C, B*N)
    return z.reshape(1, -1)


def _chan_merge(
    n_a: int, mean_a: Tensor, m2_a: Tensor, n_b: int, mean_b: Tensor, m2_b: Tensor
) -> tuple[int, Tensor, Tensor]:
    """Combine two (count, mean, M2) parts exactly (Chan et al.); works elementwise on tensors."""
    n = n_a + n_b
    if n_a == 0:
        return n_b, mean_b.clone(), m2_b.clone()
    if n_b == 0:
        return n_a, mean_a, m2_a
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


class LatentStats:
    """Running per-channel estimate of the latent statistics (float64, Chan merges).

    Args:
        estimator: "exact" (default) or "reference" (see module docstring); it selects what
            :meth:`compute` returns, the per-channel report is always exact.
        eps: the reference's ``1 / (std + eps)`` epsilon (only used by "reference").
    """

    def __init__(self, estimator: Estimator = "exact", eps: float = 1e-8) -> None:
        if estimator not in ("exact", "reference"):
            raise ValueError(f"estimator must be 'exact' or 'reference', got {estimator!r}")
        self.estimator = estimator
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        self.n = 0  # entries per channel
        self._mean: Tensor | None = None  # (C,) float64
        self._m2: Tensor | None = None  # (C,) float64
        # reference estimator: sums of per-batch mean and per-batch inverse std, number of batches
        self._sum_batch_mean = 0.0
        self._sum_batch_inv_std = 0.0
        self.num_batches = 0

    @property
    def count(self) -> int:
        """Number of latent entries seen (all channels)."""
        return self.n * (0 if self._mean is None else self._mean.numel())

    @property
    def num_channels(self) -> int | None:
        return None if self._mean is None else self._mean.numel()

    @torch.no_grad()
    def update(self, latents: Tensor) -> LatentStats:
        """Add one batch of latents (see the module docstring for the channel axis)."""
        if not isinstance(latents, Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        flat = _channels_first(latents).cpu()  # (C, N)
        c, n = flat.shape
        if n == 0 or c == 0:
            return self
        if self._mean is not None and c != self._mean.numel():
            raise ValueError(
                f"latents have {c} channels (shape {tuple(latents.shape)}), earlier batches had "
                f"{self._mean.numel()}"
            )
        mean = flat.mean(dim=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(dim=1)
        if self._mean is None:
            self._mean, self._m2 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        assert self._m2 is not None
        self.n, self._mean, self._m2 = _chan_merge(self.n, self._mean, self._m2, n, mean, m2)
        # the batch's scalar statistics, for the reference estimator
        _, b_mean, b_m2 = self._scalars(n, mean, m2)
        b_std = math.sqrt(b_m2 / (n * c - 1)) if n * c > 1 else float("nan")
        self._sum_batch_mean += b_mean
        self._sum_batch_inv_std += 1.0 / (b_std + self.eps)
        self.num_batches += 1
        return self

    @staticmethod
    def _scalars(n: int, mean: Tensor, m2: Tensor) -> tuple[int, float, float]:
        """(count, mean, M2) over all entries from equal-count channel parts."""
        c = mean.numel()
        g_mean = mean.mean()
        g_m2 = m2.sum() + n * ((mean - g_mean) ** 2).sum()
        return n * c, float(g_mean), float(g_m2)

    def merge(self, other: LatentStats) -> LatentStats:
        """Add the accumulators of ``other`` (e.g. another shard's statistics) in place."""
        if other._mean is None:
            return self
        if self._mean is None:
            self._mean, self._m2 = torch.zeros_like(other._mean), torch.zeros_like(other._mean)
        if other._mean.numel() != self._mean.numel():
            raise ValueError(f"cannot merge {other._mean.numel()}-channel statistics into {self._mean.numel()}")
        assert self._m2 is not None and other._m2 is not None
        self.n, self._mean, self._m2 = _chan_merge(self.n, self._mean, self._m2, other.n, other._mean, other._m2)
        self._sum_batch_mean += other._sum_batch_mean
        self._sum_batch_inv_std += other._sum_batch_inv_std
        self.num_batches += other.num_batches
        return self

    def _synced(self) -> LatentStats:
        """A copy holding the combined accumulators of every process (self if not distributed)."""
        from dmvae.dist import get_world_size, is_distributed

        if not (is_distributed() and get_world_size() > 1):
            return self
        import torch.distributed as dist

        c_local = torch.tensor([float(self.num_channels or 0)], dtype=torch.float64)
        c_max = _to_backend_device(c_local)
        dist.all_reduce(c_max, op=dist.ReduceOp.MAX)
        c = int(c_max.item())
        mean = self._mean if self._mean is not None else torch.zeros(c, dtype=torch.float64)
        m2 = self._m2 if self._m2 is not None else torch.zeros(c, dtype=torch.float64)
        if mean.numel() != c:
            raise ValueError(f"processes recorded latents with different channel counts ({mean.numel()} vs {c})")
        extra = [self._sum_batch_mean, self._sum_batch_inv_std, float(self.num_batches)]
        local = _to_backend_device(torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), mean, m2,
                                              torch.tensor(extra, dtype=torch.float64)]))
        parts = [torch.zeros_like(local) for _ in range(get_world_size())]
        dist.all_gather(parts, local)
        out = LatentStats(self.estimator, self.eps)
        for p in parts:
            p = p.cpu()
            other = LatentStats(self.estimator, self.eps)
            other.n = int(p[0].item())
            if other.n > 0 and c > 0:
                other._mean, other._m2 = p[1 : 1 + c].clone(), p[1 + c : 1 + 2 * c].clone()
            other._sum_batch_mean, other._sum_batch_inv_std = float(p[-3]), float(p[-2])
            other.num_batches = int(p[-1].item())
            out.merge(other)
        return out

    def all_reduce(self, *_: Any) -> LatentStats:
        """Replace the accumulators by those of all processes combined (every process calls it)."""
        combined = self._synced()
        if combined is not self:
            self.n, self._mean, self._m2 = combined.n, combined._mean, combined._m2
            self._sum_batch_mean, self._sum_batch_inv_std = combined._sum_batch_mean, combined._sum_batch_inv_std
            self.num_batches = combined.num_batches
        return self

    def compute(self, sync: bool = True) -> tuple[float, float]:
        """``(latent_mean, latent_scale)``; combines all processes if ``sync`` and distributed."""
        s = self._synced() if sync else self
        if s.count < 2 or s._mean is None or s._m2 is None:
            raise ValueError(f"LatentStats needs at least 2 latent entries, got {s.count}; call update() first")
        if self.estimator == "reference":
            return s._sum_batch_mean / s.num_batches, s._sum_batch_inv_std / s.num_batches
        count, mean, m2 = self._scalars(s.n, s._mean, s._m2)
        std = math.sqrt(m2 / (count - 1))
        if std == 0.0:
            raise ValueError("latents have zero variance; latent_scale = 1/std is undefined")
        return mean, 1.0 / std

    def summary(self, sync: bool = True) -> dict[str, Any]:
        """Exact per-channel and global mean / (Bessel) std, plus ``latent_scale = 1 / std``.

        Keys: ``latent_channels``, ``latent_mean``, ``latent_std``, ``latent_scale`` (``inf`` for
        constant latents), ``latent_channel_mean``, ``latent_channel_std`` (lists of C floats).
        """
        s = self._synced() if sync else self
        if s.count < 2 or s._mean is None or s._m2 is None:
            raise ValueError("no latents were recorded (need at least 2 entries)")
        count, mean, m2 = self._scalars(s.n, s._mean, s._m2)
        std = math.sqrt(max(m2, 0.0) / (count - 1))
        ch_std = (s._m2 / max(s.n - 1, 1)).clamp_min(0).sqrt() if s.n > 1 else torch.full_like(s._mean, math.nan)
        return {
            "latent_channels": int(s._mean.numel()),
            "latent_mean": mean,
            "latent_std": std,
            "latent_scale": 1.0 / std if std > 0 else math.inf,
            "latent_channel_mean": [float(v) for v in s._mean],
            "latent_channel_std": [float(v) for v in ch_std],
        }

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
        from dmvae._utils import unwrap_model

        target = unwrap_model(model)  # DDP / compile wrappers
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

            from dmvae.dist import is_main_process

            it = tqdm(loader, desc="latent stats", total=max_batches, disable=not is_main_process())
        with torch.no_grad():
            for i, batch in enumerate(it):
                if max_batches is not None and i >= max_batches:
                    break
                stats.update(encode(batch))
        return stats

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(estimator={self.estimator!r}, channels={self.num_channels}, "
            f"count={self.count}, batches={self.num_batches})"
        )


class LatentChannelStats(LatentStats):
    """:class:`LatentStats` whose :meth:`compute` returns the per-channel report
    (:meth:`LatentStats.summary`) instead of ``(mean, scale)``; the evaluation's name.

    As before, it combines processes only when asked (:meth:`all_reduce`, or ``sync=True``), so
    one rank alone may call :meth:`compute`."""

    def compute(self, sync: bool = False) -> dict[str, Any]:  # type: ignore[override]
        return self.summary(sync=sync)

    @property
    def mean(self) -> float:
        return self.summary(sync=False)["latent_mean"]

    @property
    def scale(self) -> float:
        return self.summary(sync=False)["latent_scale"]

    def apply_to(self, model: Any, sync: bool = True) -> tuple[float, float]:
        return LatentStats(self.estimator, self.eps).merge(self).apply_to(model, sync=sync)


def _to_backend_device(t: Tensor) -> Tensor:
    """NCCL collectives need CUDA tensors; gloo takes CPU ones."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return t.cuda()
    return t
