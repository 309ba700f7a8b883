"""Fréchet Inception Distance, Inception Score and the Inception-v3 feature extractor.

What is computed (the protocol of ADM / MAR / DMVAE):

* **Features**: the 2048-d pool3 activations of the TensorFlow Inception-v3 graph
  ``2015-12-05`` (the network of ``pt_inception-2015-12-05-6726825d.pth``), in the PyTorch port of
  ``torch-fidelity`` (the ``eval`` extra): uint8 images, TF1-exact bilinear resize to 299x299,
  ``(x - 128) / 128``. For the Inception Score, the 1008 logits *without* the fc bias
  ("logits_unbiased"), as in torch-fidelity and the original IS code.
* **Statistics**: ``mu`` = mean, ``sigma`` = unbiased covariance (``np.cov(rowvar=False)``) of the
  features, accumulated in float64 by :class:`StreamingStats` (sum and sum of outer products), so
  50k images never sit in memory and ranks merge by summation.
* **FID** (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in
  float64 (:func:`frechet_distance`).
* **IS** (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over 10 splits of the
  shuffled samples (seed 2020), mean and std over splits (:func:`inception_score`).

Network weights are never downloaded (see :class:`InceptionV3Features` for where they are looked
up). Every function here also accepts features from any other extractor, which is how the tests
run without the 95 MB weights file.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from dmvae.checks import check_int
from dmvae.files import require_file
from dmvae.layers import FrozenModule
from dmvae.metrics.image import to_uint8

__all__ = [
    "FIDStats",
    "InceptionV3Features",
    "InceptionWeightsError",
    "StreamingStats",
    "find_inception_weights",
    "frechet_distance",
    "inception_score",
    "load_reference_stats",
    "save_reference_stats",
]

ArrayLike = np.ndarray | torch.Tensor

#: File names under which the 2015-12-05 Inception weights are distributed (torch-fidelity,
#: pytorch-fid, DMVAE's ``ckpt_vae/``); all are the same network, the suffix is the sha256 prefix.
INCEPTION_FILENAMES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
    "inception-2015-12-05-6726825d.pth",
)
INCEPTION_ENV = "DMVAE_INCEPTION_WEIGHTS"


# ################################################################################################
# Fréchet distance and Inception Score
# ################################################################################################


def _as_float64(a: ArrayLike, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _clip_eigenvalues(w: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues of a PSD matrix that are below its rounding level.

    The threshold is ``max|w| * D * eps`` (numpy's ``matrix_rank`` tolerance). Such eigenvalues
    are float64 noise of either sign, and ``sqrt`` would turn noise of 1e-13 into 3e-7 per
    dimension: with fewer samples than dimensions (a 1k-image FID in 2048-d) that is thousands of
    spurious terms. Full-rank statistics are unaffected.
    """
    tol = w.abs().max() * w.shape[0] * torch.finfo(torch.float64).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace term is
    ``sum sqrt(eig(A^T S2 A))`` with ``S1 = A A^T`` (Cholesky factor; the symmetric square root
    when S1 is singular): that matrix is symmetric PSD and similar to ``S1 S2``, so its eigenvalues
    are those of ``S1 S2`` but come from a stable symmetric solver, eigenvalues only. It equals the
    ``scipy.linalg.sqrtm(S1 @ S2)`` formulation of pytorch-fid / ADM to ~1e-9 on full-rank
    statistics, needs no scipy, and takes ~1.5 s in 2048-d on one CPU core. With fewer samples than
    feature dimensions (singular covariances) eigenvalues below the rounding level are treated as
    exact zeros, so the result stays real and identical statistics still give ~0, where ``sqrtm``
    goes complex or needs an ``eps`` offset. The distance is >= 0 by definition, so a negative
    result (float64 rounding of identical statistics, e.g. ``-1e-28``) is returned as 0.
    """
    m1, m2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got {m1.shape} and {m2.shape}")
    d = m1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be ({d}, {d}) to match mu, got {s.shape}")
    a1 = torch.from_numpy((s1 + s1.T) / 2)
    a2 = torch.from_numpy((s2 + s2.T) / 2)
    factor, info = torch.linalg.cholesky_ex(a1)  # S1 = L L^T
    if int(info) != 0:  # singular S1: symmetric square root instead (S1 = R R, R = R^T)
        w, v = torch.linalg.eigh(a1)
        factor = (v * _clip_eigenvalues(w).sqrt()) @ v.T
    m = factor.T @ a2 @ factor  # (D, D), similar to S1 S2
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(_clip_eigenvalues(eig).sqrt().sum())
    diff = m1 - m2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def inception_score(
    logits: ArrayLike, splits: int = 10, shuffle_seed: int | None = 2020
) -> tuple[float, float]:
    """Inception Score from classifier logits, ``(mean, std)`` over ``splits``.

    Per split: ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))`` in float64. Samples are first permuted
    with ``np.random.RandomState(shuffle_seed)`` (None = keep the order), which reproduces
    torch-fidelity's ``isc`` (splits 10, seed 2020) exactly. Use the *unbiased* logits of
    :class:`InceptionV3Features` (the fc layer without bias) for the standard number.
    """
    splits = check_int("splits", splits, 1)
    x = torch.as_tensor(_as_float64(logits, "logits"))
    if x.dim() != 2:
        raise ValueError(f"logits must be (N, num_classes), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)  # marginal p(y) of the split
        kl = (p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1)  # (n_split,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ################################################################################################
# statistics: reference files and streaming accumulation
# ################################################################################################


class FIDStats(NamedTuple):
    """Feature statistics: ``mu`` (D,) and ``sigma`` (D, D), float64 numpy arrays."""

    mu: np.ndarray
    sigma: np.ndarray

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``mu``/``sigma`` as an ``.npz`` in the ``adm_in256_stats.npz`` layout."""
        return save_reference_stats(path, self.mu, self.sigma)


def load_reference_stats(path: str | os.PathLike[str]) -> FIDStats:
    """Read FID reference statistics (keys ``mu`` and ``sigma``) from an ``.npz`` file.

    Reads both the ADM evaluator's ``VIRTUAL_imagenet256_labeled.npz`` (keys ``arr_0``, ``mu``,
    ``sigma``, ``mu_s``, ``sigma_s``; only ``mu``/``sigma`` are used, the images are not
    decompressed) and MAR/DMVAE's ``adm_in256_stats.npz`` (keys ``mu``, ``sigma``). Nothing is
    unpickled. Raises ``KeyError`` listing the keys found when ``mu``/``sigma`` are absent.
    """
    path = require_file(path, "reference statistics file")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = sorted(f.files)
            if "mu" not in keys or "sigma" not in keys:
                hint = (
                    " It holds images only: pass it as a reference batch and dmvae computes the "
                    "statistics from its images."
                    if "arr_0" in keys
                    else ""
                )
                from dmvae.npz import NpzKeyError

                raise NpzKeyError(
                    f"{path}: expected FID statistics under keys 'mu' and 'sigma' (ADM "
                    f"VIRTUAL_*.npz or adm_in256_stats.npz layout), found keys {keys}.{hint}"
                )
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except KeyError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{path}: expected mu of shape (D,) and sigma of shape (D, D), got {mu.shape} and {sigma.shape}"
        )
    return FIDStats(mu, sigma)


def save_reference_stats(path: str | os.PathLike[str], mu: ArrayLike, sigma: ArrayLike) -> Path:
    """Atomically write ``mu``/``sigma`` (float64) to ``path`` (an ``.npz``, adm_in256_stats layout)."""
    import io

    from dmvae.files import atomic_write_bytes

    mu_a, sigma_a = _as_float64(mu, "mu"), _as_float64(sigma, "sigma")
    if mu_a.ndim != 1 or sigma_a.shape != (mu_a.shape[0], mu_a.shape[0]):
        raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu_a.shape} and {sigma_a.shape}")
    buf = io.BytesIO()
    np.savez(buf, mu=mu_a, sigma=sigma_a)
    return atomic_write_bytes(path, buf.getvalue())


class StreamingStats:
    """Running mean and covariance of feature vectors, in float64.

    Keeps ``n``, ``sum_x`` (D,) and ``sum_xxT`` (D, D); :meth:`compute` returns
    ``mu = sum_x / n`` and ``sigma = (sum_xxT - n mu mu^T) / (n - 1)`` (the unbiased covariance of
    ``np.cov(features, rowvar=False)``). Summation makes the result independent of how the
    features were batched (up to float64 rounding), and ranks combine by adding their sums
    (:meth:`merge`, :meth:`all_reduce`). Memory is O(D^2) whatever the number of samples.

    Example::

        stats = StreamingStats()
        for images in loader:
            stats.update(extractor(images)["pool"])
        stats.all_reduce()              # under torchrun; no-op otherwise
        mu, sigma = stats.compute()
    """

    def __init__(self, dim: int | None = None, device: torch.device | str | None = None) -> None:
        self.dim = dim
        self.n = 0
        self.sum_x: torch.Tensor | None = None  # (D,) float64
        self.sum_xxT: torch.Tensor | None = None  # (D, D) float64
        self._device = torch.device(device) if device is not None else None
        if dim is not None:
            self._allocate(dim, self._device or torch.device("cpu"))

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.sum_x = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_xxT = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: ArrayLike) -> StreamingStats:
        """Add a batch of feature vectors, (N, D) (any float dtype; accumulated in float64)."""
        f = torch.as_tensor(features)
        if f.dim() != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(f.shape)}")
        if self.sum_x is None:
            self._allocate(f.shape[1], self._device or f.device)
        assert self.sum_x is not None and self.sum_xxT is not None
        if f.shape[1] != self.dim:
            raise ValueError(f"features have dimension {f.shape[1]}, these statistics have {self.dim}")
        f = f.detach().to(device=self.sum_x.device, dtype=torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("features contain NaN or inf")
        self.n += f.shape[0]
        self.sum_x += f.sum(dim=0)
        self.sum_xxT += f.T @ f
        return self

    def compute(self) -> FIDStats:
        """``(mu, sigma)`` as float64 numpy arrays; needs at least two samples."""
        if self.n < 2 or self.sum_x is None or self.sum_xxT is None:
            raise ValueError(f"need at least 2 feature vectors to estimate a covariance, have {self.n}")
        mu = self.sum_x / self.n
        sigma = (self.sum_xxT - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry despite rounding
        return FIDStats(mu.cpu().numpy(), sigma.cpu().numpy())

    def merge(self, other: StreamingStats) -> StreamingStats:
        """Add another accumulator's samples to this one (in place)."""
        if other.n == 0:
            return self
        assert other.sum_x is not None and other.sum_xxT is not None
        if self.sum_x is None:
            self._allocate(int(other.dim or 0), other.sum_x.device)
        assert self.sum_x is not None and self.sum_xxT is not None
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into dimension {self.dim}")
        self.n += other.n
        self.sum_x += other.sum_x.to(self.sum_x.device)
        self.sum_xxT += other.sum_xxT.to(self.sum_xxT.device)
        return self

    def all_reduce(self, group: Any = None) -> StreamingStats:
        """Sum the accumulators of all ranks (``torch.distributed``); a no-op when not distributed.

        Every rank must have seen at least one batch (so that the dimension is known). With NCCL
        the sums must live on the rank's CUDA device (pass ``device=`` at construction).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.sum_x is None or self.sum_xxT is None:
            raise ValueError("all_reduce needs the feature dimension: update() at least once first")
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum_x.device)
        for t in (n, self.sum_x, self.sum_xxT):
            dist.all_reduce(t, group=group)
        self.n = int(round(n.item()))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to resume accumulation (``torch.save`` / safetensors friendly)."""
        if self.sum_x is None or self.sum_xxT is None:
            return {"n": torch.tensor(0, dtype=torch.int64)}
        return {
            "n": torch.tensor(self.n, dtype=torch.int64),
            "sum_x": self.sum_x.cpu(),
            "sum_xxT": self.sum_xxT.cpu(),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> StreamingStats:
        n = int(state["n"])
        if n == 0:
            self.n, self.sum_x, self.sum_xxT, self.dim = 0, None, None, None
            return self
        sum_x, sum_xxT = state["sum_x"], state["sum_xxT"]
        d = sum_x.shape[0]
        if sum_x.dim() != 1 or tuple(sum_xxT.shape) != (d, d):
            raise ValueError(
                f"expected sum_x (D,) and sum_xxT (D, D), got {tuple(sum_x.shape)} and {tuple(sum_xxT.shape)}"
            )
        device = self._device or torch.device("cpu")
        self.n, self.dim = n, d
        self.sum_x = sum_x.to(device=device, dtype=torch.float64).clone()
        self.sum_xxT = sum_xxT.to(device=device, dtype=torch.float64).clone()
        return self


# ################################################################################################
# the Inception-v3 network (torch-fidelity's port of the TF 2015-12-05 graph)
# ################################################################################################


class InceptionWeightsError(FileNotFoundError):
    """The Inception-v3 weights file could not be found (nothing is ever downloaded)."""


def _torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(weights: str | os.PathLike[str] | None = None) -> Path:
    """Locate the Inception-v3 2015-12-05 weights file, in this order:

    1. ``weights``: a local file, or ``"hf://owner/repo/path/in/repo.pth"`` (from the Hugging Face
       cache, or downloaded unless ``HF_HUB_OFFLINE=1``);
    2. the ``DMVAE_INCEPTION_WEIGHTS`` environment variable (same forms);
    3. torch's hub cache (``$TORCH_HOME/hub/checkpoints/``), where torch-fidelity and pytorch-fid
       keep their downloads, under any of :data:`INCEPTION_FILENAMES`.

    Raises :class:`InceptionWeightsError` naming every place that was checked.
    """
    checked: list[str] = []
    for source, origin in ((weights, "weights="), (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}")):
        if source is None or str(source) == "":
            continue
        from dmvae.sources import resolve_file

        try:
            return resolve_file(source, what=f"Inception-v3 weights ({origin})")
        except FileNotFoundError as e:
            raise InceptionWeightsError(str(e)) from e
    hub_dir = _torch_hub_checkpoint_dir()
    for name in INCEPTION_FILENAMES:
        if (hub_dir / name).is_file():
            return hub_dir / name
    checked.append(f"${INCEPTION_ENV} (unset)")
    checked.append(f"{hub_dir}/{{{', '.join(INCEPTION_FILENAMES)}}}")
    raise InceptionWeightsError(
        "Inception-v3 (2015-12-05) weights not found; checked: "
        + "; ".join(checked)
        + ". dmvae never downloads them at run time. Get 'weights-inception-2015-12-05-6726825d.pth' "
        "from the torch-fidelity v0.2.0 release (or 'pt_inception-2015-12-05-6726825d.pth' from "
        "pytorch-fid) on a machine with internet access and pass its path (--inception PATH, "
        f"weights=PATH or ${INCEPTION_ENV})."
    )


_BUILD_LOCK = threading.Lock()
_RANDOM = object()  # sentinel: keep the random initialisation (tests of the architecture only)


def _build_fidelity_inception(state_dict: Any, source: str) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` built without its loader.

    Its constructor always fetches weights itself (a download, or ``torch.load(weights_only=False)``
    of a given path). We hand it our already-read state dict instead, through the one hook it
    calls, and check keys and shapes strictly before anything is copied.
    """
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as tfi
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the Inception-v3 feature extractor needs torch-fidelity: pip install 'dmvae[eval]'"
        ) from e
    from dmvae.hub import check_state_dict

    class _Inception(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, sd: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
            if sd is _RANDOM:
                return None
            check_state_dict(self, sd, source)
            return super().load_state_dict(sd, strict=True, assign=assign)

    with _BUILD_LOCK:
        original = tfi.load_state_dict_from_url
        tfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict  # type: ignore[assignment]
        try:
            return _Inception("inception-v3-compat", ["2048", "logits_unbiased"])
        finally:
            tfi.load_state_dict_from_url = original


class InceptionV3Features(FrozenModule):
    """The FID Inception-v3 (TF ``2015-12-05`` graph, torch-fidelity port), frozen and in eval mode.

    ``forward(images) -> {"pool": (N, 2048), "logits": (N, 1008)}`` (float32). ``images`` are
    (N, 3, H, W) uint8 in [0, 255] (any H, W: resized inside to 299x299 with TF1-exact bilinear
    interpolation), or floats in [-1, 1], which are first rounded to uint8 like a saved image
    (:func:`dmvae.metrics.image.to_uint8`). ``"logits"`` are the fc outputs without the bias, as
    the Inception Score expects.

    Args:
        weights: the weights file (``.pth`` state dict read with ``torch.load(weights_only=True)``,
            or ``.safetensors``), ``"hf://owner/repo/file"``, or a state dict. None = search
            (:func:`find_inception_weights`).
        pretrained: False = random weights and no file at all (tests of the plumbing only; the
            features mean nothing).
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
        *,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        if not pretrained:
            if weights is not None:
                raise ValueError("pass either weights=... or pretrained=False, not both")
            sd: Any = _RANDOM
            source = "random weights"
        elif isinstance(weights, Mapping):
            sd, source = dict(weights), "the given state dict"
        else:
            from dmvae.files import read_state_dict_file

            path = find_inception_weights(weights)
            source = str(path)
            sd = read_state_dict_file(path)
        self.net = _build_fidelity_inception(sd, source)
        self.weights_source = source
        self.freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        x = to_uint8(images)  # (N, 3, H, W) uint8
        pool, logits = self.net(x.to(next(self.parameters()).device))  # (N, 2048), (N, 1008)
        return {"pool": pool, "logits": logits}
