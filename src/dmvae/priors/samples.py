"""A reference distribution given by a bank of samples (paper Table 1 "SigLIP-text", or any
precomputed set of latents / features).

``sample`` draws rows of the bank (optionally jittered by a Gaussian kernel of width
``bandwidth``). ``velocity`` is the *exact* flow-matching velocity of the bank's (smoothed)
empirical measure p = (1/N) sum_i N(x_i, h^2 I) -- Eq. (1)-(2) of ``priors.analytic`` with one
component per sample -- evaluated by streaming over the bank in chunks, so memory stays
O(B * chunk + chunk * D) even for a 50k x 1k bank. With h = 0 the measure is a sum of deltas and
E[x | x_t] is a softmax-weighted average of bank rows; that is the best score an infinitely
flexible network fitted on the bank could learn (it memorises the bank). For a *generalising*
real score fit a LatentDiT on the bank with :func:`dmvae.priors.fit_reference_model` and use
:class:`~dmvae.priors.LearnedPrior`. Time convention: t = 1 data, t = 0 noise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dmvae.priors.base import ReferencePrior, register_prior
from dmvae.transport import gaussian_velocity

__all__ = ["SamplesPrior", "empirical_velocity"]


def empirical_velocity(
    x_t: torch.Tensor,
    t: torch.Tensor,
    bank: torch.Tensor,
    *,
    bandwidth: float = 0.0,
    bank_mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Velocity of ``(1/N) sum_i N(bank_i, bandwidth^2 I)`` at ``(x_t, t)``; streams over the bank.

    Args:
        x_t: (B, *S) noisy points. t: (B,) times in [0, 1] (1 = data).
        bank: (N, *S) samples. bank_mask: optional (B, N) bool, True = component allowed for that row.
    Returns: (B, *S) float32 velocity.
    """
    b = x_t.shape[0]
    x = x_t.float().flatten(1)  # (B, D)
    tt = t.float().reshape(b, 1)  # (B, 1)
    h2 = float(bandwidth) ** 2
    d = (tt.square() * h2 + (1 - tt).square()).clamp_min(1e-12)  # (B, 1) per-coordinate variance of x_t (as gaussian_velocity)
    x_sq = x.square().sum(1, keepdim=True)  # (B, 1)
    run_max = torch.full((b, 1), float("-inf"), device=x.device)
    run_sum = torch.zeros((b, 1), device=x.device)
    run_mean = torch.zeros_like(x)  # (B, D) running sum_i w_i x_i (rescaled to run_max)
    for start in range(0, bank.shape[0], chunk_size):
        xb = bank[start : start + chunk_size].to(x.device, torch.float32).flatten(1)  # (n, D)
        # |x_t - t x_i|^2 = |x_t|^2 - 2 t x_t.x_i + t^2 |x_i|^2
        dist = x_sq - 2 * tt * (x @ xb.T) + tt.square() * xb.square().sum(1)[None]  # (B, n)
        logit = -0.5 * dist.clamp_min(0) / d  # (B, n)
        if bank_mask is not None:
            logit = logit.masked_fill(~bank_mask[:, start : start + chunk_size].to(x.device), float("-inf"))
        new_max = torch.maximum(run_max, logit.max(1, keepdim=True).values)
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        scale = torch.exp(run_max - safe_max)  # (B, 1)
        w = torch.exp(logit - safe_max)  # (B, n)
        run_sum = run_sum * scale + w.sum(1, keepdim=True)
        run_mean = run_mean * scale + w @ xb
        run_max = new_max
    if (run_sum <= 0).any():
        raise ValueError("empirical_velocity: a row has no allowed bank sample (empty class?)")
    mean_x = run_mean / run_sum  # (B, D) sum_i r_i x_i
    # v = sum_i r_i [x_i + (t h^2 - (1 - t)) (x_t - t x_i) / d]: the Gaussian posterior at the mean
    v, _ = gaussian_velocity(x, tt, mean_x, h2)
    return v.reshape(x_t.shape)


@register_prior("samples")
class SamplesPrior(ReferencePrior):
    """A bank of reference samples, from a tensor or a safetensors file.

    Args:
        samples: (N, *shape) tensor, or a path to a ``.safetensors`` file holding it under ``key``.
        labels: optional (N,) int class of each sample (or its key in the file); makes the prior
            class-conditional with ``num_classes = labels.max() + 1`` unless given.
        bandwidth: std of the Gaussian kernel around each sample (0 = plain empirical measure).
        shape: reshape each row to this shape (e.g. 1-D text embeddings -> (C, H, W)).
        key, labels_key: tensor names inside a safetensors file.
        chunk_size: bank rows processed at once by ``velocity`` (memory bound).
    """

    def __init__(
        self,
        samples: torch.Tensor | str | os.PathLike[str],
        labels: torch.Tensor | str | None = None,
        *,
        bandwidth: float = 0.0,
        shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        key: str = "samples",
        labels_key: str | None = None,
        chunk_size: int = 4096,
    ) -> None:
        if isinstance(samples, (str, os.PathLike)):
            from dmvae.files import read_safetensors

            tensors = read_safetensors(Path(samples))
            if key not in tensors:
                raise KeyError(f"{samples} has no tensor {key!r}; found {sorted(tensors)}")
            bank = tensors[key]
            lk = labels_key or (labels if isinstance(labels, str) else None)
            if lk is not None:
                if lk not in tensors:
                    raise KeyError(f"{samples} has no tensor {lk!r}; found {sorted(tensors)}")
                labels = tensors[lk]
        else:
            bank = torch.as_tensor(samples)
        if isinstance(labels, str):
            raise ValueError("labels given by name need samples given as a safetensors path")
        if bank.ndim < 2 or bank.shape[0] < 1:
            raise ValueError(f"samples must be (N, *shape) with N >= 1, got {tuple(bank.shape)}")
        if not bank.is_floating_point():
            raise TypeError(f"samples must be floating point, got {bank.dtype}")
        if shape is not None:
            bank = bank.reshape(bank.shape[0], *shape)
        if not torch.isfinite(bank).all():
            raise ValueError("samples contain NaN or inf")
        if labels is not None:
            labels = torch.as_tensor(labels).long()
            if labels.shape != (bank.shape[0],):
                raise ValueError(f"labels must have shape ({bank.shape[0]},), got {tuple(labels.shape)}")
            num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        elif num_classes is not None:
            raise ValueError("num_classes given without labels")
        if bandwidth < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
        super().__init__(bank.shape[1:], num_classes=num_classes)
        self.register_buffer("samples", bank.float().contiguous())
        self.register_buffer("sample_labels", labels if labels is not None else None)
        self.bandwidth = float(bandwidth)
        self.chunk_size = int(chunk_size)

    def __len__(self) -> int:
        return self.samples.shape[0]

    def sample(self, n, *, labels=None, generator=None, device=None) -> torch.Tensor:
        labels = self._check_labels(labels, n)
        dev = generator.device if generator is not None else self.samples.device
        if labels is None:
            idx = torch.randint(len(self), (n,), generator=generator, device=dev)
        else:
            idx = torch.empty(n, dtype=torch.long, device=dev)
            u = torch.rand(n, generator=generator, device=dev)
            all_idx = torch.arange(len(self), device=dev)
            for c in labels.unique().tolist():
                rows = (labels == c).nonzero().flatten().to(dev)
                pool = all_idx if c == self.num_classes else (self.sample_labels.to(dev) == c).nonzero().flatten()
                if pool.numel() == 0:
                    raise ValueError(f"no bank sample has label {c}")
                idx[rows] = pool[(u[rows] * pool.numel()).long().clamp_max(pool.numel() - 1)]
        out = self.samples[idx.to(self.samples.device)].to(dev)
        if self.bandwidth > 0:
            out = out + self.bandwidth * torch.randn(out.shape, generator=generator, device=dev)
        return out.to(device) if device is not None else out

    def velocity(self, x_t, t, labels=None) -> torch.Tensor:
        x_t, t = self._check_xt(x_t, t)
        labels = self._check_labels(labels, x_t.shape[0])
        mask = None
        if labels is not None:
            sl = self.sample_labels.to(x_t.device)
            mask = (sl[None] == labels[:, None]) | (labels[:, None] == self.num_classes)  # (B, N)
        v = empirical_velocity(
            x_t, t, self.samples, bandwidth=self.bandwidth, bank_mask=mask, chunk_size=self.chunk_size
        )
        return v.to(x_t.dtype)
