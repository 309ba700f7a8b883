"""The 2-D "S-shape" reference distribution of the paper's toy study (Fig. 3, App. C).

Sampling follows the reference ``SShapeDistribution2D`` draw for draw, so with the same seed the
samples are bitwise equal to the reference's (numpy PCG64 ``default_rng``)::

    u ~ U(-1, 1)                                       (one uniform per point)
    skeleton  (a sin(pi u),  b u - c sin(2 pi u))      a = amplitude, b = vertical_scale, c = skew
    tangent   (a pi cos(pi u),  b - 2 pi c cos(2 pi u)),  normalised (|.| + 1e-8)
    r ~ N(0, thickness)      added along angle = atan2(tangent_x, -tangent_y)
    e ~ N(0, diffusion (0.4 + 0.6 |u|)), shape (n, 1): ONE draw added to both coordinates
    y -> -y (flip_y), then clip to x_range, y_range.

There is no closed-form velocity; :meth:`SShape2D.velocity` is the exact velocity of a smoothed
empirical measure of ``bank_size`` samples (see :class:`~dmvae.priors.SamplesPrior`), which is a
good stand-in for tests. The demo fits a LatentDiT to samples instead, as the paper does.
"""

from __future__ import annotations

import numpy as np
import torch

from dmvae.priors.base import ReferencePrior, register_prior
from dmvae.priors.samples import empirical_velocity

__all__ = ["SShape2D", "sshape_numpy"]


def sshape_numpy(
    n: int,
    rng: np.random.Generator,
    *,
    thickness: float = 0.06,
    diffusion: float = 0.03,
    x_range: tuple[float, float] = (-1.0, 1.0),
    y_range: tuple[float, float] = (-1.0, 1.0),
    amplitude: float = 0.85,
    vertical_scale: float = 0.85,
    skew: float = 0.15,
    flip_y: bool = True,
) -> np.ndarray:
    """``n`` S-shape samples as a float64 (n, 2) array, consuming ``rng`` exactly like the reference."""
    u = rng.uniform(-1.0, 1.0, n)  # draw 1
    x = amplitude * np.sin(np.pi * u)
    y = vertical_scale * u - skew * np.sin(2 * np.pi * u)
    tx = amplitude * np.pi * np.cos(np.pi * u)
    ty = vertical_scale - 2 * np.pi * skew * np.cos(2 * np.pi * u)
    norm = np.sqrt(tx**2 + ty**2) + 1e-8
    tx, ty = tx / norm, ty / norm
    angle = np.arctan2(tx, -ty)
    r = rng.normal(0.0, thickness, n)  # draw 2
    x = x + r * np.cos(angle)
    y = y + r * np.sin(angle)
    scale = diffusion * (0.4 + 0.6 * np.abs(u))
    e = rng.normal(0.0, scale[:, None], (n, 1))  # draw 3: one per point, both coordinates
    pts = np.stack([x, y], axis=1) + e
    if flip_y:
        pts[:, 1] = -pts[:, 1]
    pts[:, 0] = np.clip(pts[:, 0], *x_range)
    pts[:, 1] = np.clip(pts[:, 1], *y_range)
    return pts


@register_prior("sshape2d")
class SShape2D(ReferencePrior):
    """The paper's 2-D S-shape reference (shape ``(2,)``), reference-exact sampler.

    Args:
        seed: seed of the internal ``numpy.random.default_rng`` stream used when ``sample`` gets
            no ``generator`` (successive calls continue the stream, as in the reference).
        bank_size, bandwidth, bank_seed: the sample bank behind :meth:`velocity`.
        **shape: the shape parameters of :func:`sshape_numpy` (``thickness``, ``diffusion``,
            ``x_range``, ``y_range``, ``amplitude``, ``vertical_scale``, ``skew``, ``flip_y``);
            the defaults there are the reference's.
    """

    def __init__(
        self,
        seed: int = 42,
        *,
        bank_size: int = 8192,
        bandwidth: float = 0.01,
        bank_seed: int = 12345,
        **shape,
    ) -> None:
        super().__init__((2,))
        self.params = dict(shape)  # only what differs from sshape_numpy's defaults
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.bandwidth = float(bandwidth)
        bank = sshape_numpy(bank_size, np.random.default_rng(bank_seed), **self.params)
        self.register_buffer("bank", torch.from_numpy(bank).float())

    def sample_numpy(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """float64 (n, 2) samples; from the internal stream unless ``rng`` is given."""
        return sshape_numpy(int(n), self.rng if rng is None else rng, **self.params)

    def sample(self, n, *, labels=None, generator=None, device=None) -> torch.Tensor:
        self._check_labels(labels, n)
        if generator is not None:
            # derive a numpy stream from the torch generator so seeding it reproduces the draw
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            rng = np.random.default_rng(seed)
        else:
            rng = None
        out = torch.from_numpy(self.sample_numpy(n, rng)).float()
        return out.to(device if device is not None else self.bank.device)

    def velocity(self, x_t, t, labels=None) -> torch.Tensor:
        x_t, t = self._check_xt(x_t, t)
        self._check_labels(labels, x_t.shape[0])
        return empirical_velocity(x_t, t, self.bank, bandwidth=self.bandwidth).to(x_t.dtype)
