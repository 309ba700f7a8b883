"""Closed-form priors: N(mu, diag sigma^2) and a Gaussian mixture (paper Table 1 "Gaussian", "GMM").

For a Gaussian x ~ N(mu, sigma^2) (per coordinate) on the path x_t = t x + (1 - t) eps, x_t is
Gaussian with mean t mu and variance d_t = t^2 sigma^2 + (1 - t)^2, and the posterior means are::

    E[x   | x_t] = mu + t sigma^2 (x_t - t mu) / d_t
    E[eps | x_t] =      (1 - t)  (x_t - t mu) / d_t
    v(x_t, t)    = E[x - eps | x_t] = mu + (t sigma^2 - (1 - t)) (x_t - t mu) / d_t      (1)

which is finite for every t in [0, 1] (no division by 1 - t). A mixture sum_k pi_k N(mu_k, sigma_k^2)
has v = sum_k r_k(x_t, t) v_k(x_t, t) with responsibilities r_k proportional to
pi_k N(x_t; t mu_k, d_{k,t}) (2). Time convention: t = 1 data, t = 0 noise (see ``priors.base``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dmvae.priors.base import ReferencePrior, _expand, register_prior
from dmvae.transport import gaussian_velocity

__all__ = ["GaussianMixturePrior", "GaussianPrior"]


def _as_param(value: float | torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=torch.float32)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite, got {value!r}" if v.numel() == 1 else f"{name} holds NaN or inf")
    try:
        return torch.broadcast_to(v, shape).clone()
    except RuntimeError:
        raise ValueError(f"{name} must be a scalar or broadcastable to {shape}, got shape {tuple(v.shape)}") from None


def _draw_device(generator: torch.Generator | None, device, fallback: torch.device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else fallback


@register_prior("gaussian")
class GaussianPrior(ReferencePrior):
    """``N(mean, std^2)`` per coordinate; the paper's synthetic "Gaussian" prior is N(0, I).

    Args:
        shape: shape of one latent, e.g. ``(32, 16, 16)``.
        mean: scalar or tensor broadcastable to ``shape``. Default 0.
        std: scalar or tensor broadcastable to ``shape``, > 0. Default 1.
    """

    def __init__(self, shape: Sequence[int], mean: float | torch.Tensor = 0.0, std: float | torch.Tensor = 1.0) -> None:
        super().__init__(shape)
        self.register_buffer("mean", _as_param(mean, self.shape, "mean"))
        self.register_buffer("std", _as_param(std, self.shape, "std"))
        if (self.std <= 0).any():
            raise ValueError("std must be > 0 everywhere")

    def sample(self, n, *, labels=None, generator=None, device=None) -> torch.Tensor:
        self._check_labels(labels, n)
        dev = _draw_device(generator, device, self.mean.device)
        eps = torch.randn((n, *self.shape), generator=generator, device=dev)
        out = self.mean.to(dev) + self.std.to(dev) * eps  # (n, *shape)
        return out.to(device) if device is not None else out

    def velocity(self, x_t, t, labels=None) -> torch.Tensor:
        x_t, t = self._check_xt(x_t, t)
        self._check_labels(labels, x_t.shape[0])
        x = x_t.float()
        tt = _expand(t, x)  # (B, 1, ..)
        v, _ = gaussian_velocity(x, tt, self.mean, self.std.square())  # Eq. (1)
        return v.to(x_t.dtype)


@register_prior("gmm")
class GaussianMixturePrior(ReferencePrior):
    """Mixture ``sum_k w_k N(means_k, stds_k^2)`` with closed-form velocity (Eq. 2 above).

    The paper's "GMM" prior has 10 components but its parameters are not published; the default
    here draws ``means ~ N(0, mean_std^2 I)`` from ``seed`` with a shared isotropic ``std``, equal
    weights. Pass ``means`` (K, *shape), ``stds`` (scalar, (K,) or (K, *shape)) and ``weights``
    (K,) to choose them yourself.

    With ``class_conditional=True`` the prior has ``num_classes = K``: label k selects component k
    (p_r(z | y = k) = N(means_k, stds_k^2)) and label K is the unconditional mixture, matching the
    LatentDiT null-label convention so CFG in the DM loss works with it.
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_components: int = 10,
        *,
        means: torch.Tensor | None = None,
        stds: float | torch.Tensor = 0.5,
        weights: torch.Tensor | None = None,
        mean_std: float = 1.0,
        seed: int = 0,
        class_conditional: bool = False,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if means is not None:
            means = torch.as_tensor(means, dtype=torch.float32)
            if tuple(means.shape[1:]) != shape:
                raise ValueError(f"means must have shape (K, {', '.join(map(str, shape))}), got {tuple(means.shape)}")
            num_components = means.shape[0]
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        super().__init__(shape, num_classes=num_components if class_conditional else None)
        k = num_components
        if means is None:
            g = torch.Generator().manual_seed(seed)
            means = mean_std * torch.randn((k, *shape), generator=g)
        stds_t = torch.as_tensor(stds, dtype=torch.float32)
        if stds_t.ndim == 1 and stds_t.shape[0] == k and len(shape) > 0:
            stds_t = stds_t.reshape(k, *([1] * len(shape)))
        self.register_buffer("means", _as_param(means, (k, *shape), "means"))
        self.register_buffer("stds", _as_param(stds_t, (k, *shape), "stds"))
        if (self.stds <= 0).any():
            raise ValueError("stds must be > 0")
        w = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (k,) or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum, got {w}")
        self.register_buffer("log_weights", (w / w.sum()).log())

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n, *, labels=None, generator=None, device=None) -> torch.Tensor:
        labels = self._check_labels(labels, n)
        dev = _draw_device(generator, device, self.means.device)
        comp = torch.multinomial(self.log_weights.exp().to(dev), n, replacement=True, generator=generator)
        if labels is not None:
            labels = labels.to(dev)
            comp = torch.where(labels < self.num_components, labels, comp)
        eps = torch.randn((n, *self.shape), generator=generator, device=dev)
        out = self.means.to(dev)[comp] + self.stds.to(dev)[comp] * eps  # (n, *shape)
        return out.to(device) if device is not None else out

    def velocity(self, x_t, t, labels=None) -> torch.Tensor:
        x_t, t = self._check_xt(x_t, t)
        labels = self._check_labels(labels, x_t.shape[0])
        x = x_t.float().flatten(1)[:, None]  # (B, 1, D)
        tt = t.float()[:, None, None]  # (B, 1, 1)
        mu = self.means.flatten(1)[None]  # (1, K, D)
        var = self.stds.square().flatten(1)[None]  # (1, K, D)
        v_k, d = gaussian_velocity(x, tt, mu, var)  # (B, K, D), Eq. (1) per component
        r = x - tt * mu  # (B, K, D)
        log_r = self.log_weights[None] - 0.5 * (r.square() / d + d.log()).sum(-1)  # (B, K)
        if labels is not None:
            pick = labels < self.num_components
            onehot = torch.full_like(log_r, float("-inf"))
            onehot[pick, labels[pick]] = 0.0
            log_r = torch.where(pick[:, None], onehot, log_r)
        resp = log_r.softmax(dim=-1)  # (B, K), Eq. (2)
        v = torch.einsum("bk,bkd->bd", resp, v_k)
        return v.reshape(x_t.shape).to(x_t.dtype)
