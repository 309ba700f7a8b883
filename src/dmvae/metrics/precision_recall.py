"""Improved precision and recall of generative models (Kynkäänniemi et al. 2019).

Each feature set's manifold is the union of balls around its points, the radius of a ball being
the distance to the k-th nearest *other* point of the same set:

    precision = |{f in fake : exists r in real, ||f - r|| <= radius_k(r)}| / |fake|
    recall    = |{r in real : exists f in fake, ||r - f|| <= radius_k(f)}| / |real|

As ADM's evaluator and torch-fidelity ``prc`` (k = 3). Features are typically the 2048-d
Inception pool features of :class:`dmvae.metrics.fid.InceptionV3Features`.
"""

from __future__ import annotations

import numpy as np
import torch

from dmvae.checks import check_int

__all__ = ["precision_recall"]


def precision_recall(
    real_features: torch.Tensor | np.ndarray,
    fake_features: torch.Tensor | np.ndarray,
    k: int = 3,
    *,
    row_batch_size: int = 1024,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ``(precision, recall)``.

    Each set's manifold is the union of balls around its points, the radius being the distance to
    the k-th nearest *other* point of the same set. Precision = fraction of fake samples inside
    the real manifold; recall = fraction of real samples inside the fake manifold. ``d <= r``
    counts as inside. As ADM's evaluator and torch-fidelity ``prc``, with k = 3 by default.
    Distances are computed in blocks of ``row_batch_size`` rows (memory O(rows x N)).
    """
    k = check_int("k", k, 1)
    row_batch_size = check_int("row_batch_size", row_batch_size, 1)
    real = torch.as_tensor(real_features).to(device=device, dtype=dtype)
    fake = torch.as_tensor(fake_features).to(device=device, dtype=dtype)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"expected (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    for name, f in (("real", real), ("fake", fake)):
        if f.shape[0] <= k:
            raise ValueError(f"need more than k={k} {name} samples, got {f.shape[0]}")

    def radii(x: torch.Tensor) -> torch.Tensor:  # (N,) distance to the k-th neighbour, self excluded
        out = [
            torch.cdist(x[i : i + row_batch_size], x).kthvalue(k + 1, dim=1).values
            for i in range(0, len(x), row_batch_size)
        ]
        return torch.cat(out)

    def inside(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor) -> torch.Tensor:
        hits = [
            (torch.cdist(query[i : i + row_batch_size], ref) <= ref_radii[None]).any(dim=1)
            for i in range(0, len(query), row_batch_size)
        ]
        return torch.cat(hits)

    precision = inside(fake, real, radii(real)).double().mean().item()
    recall = inside(real, fake, radii(fake)).double().mean().item()
    return precision, recall
