"""Evaluation protocols: reconstruction (rFID, PSNR, SSIM, LPIPS, latent statistics) and
generation (gFID, IS, precision/recall) in the field's standard form, plus ADM ``.npz`` I/O.

Exactly what is computed, and why, is written down in ``docs/evaluation.md``. In short:

* **Reconstruction** (:func:`evaluate_reconstruction`): every image of a folder (or an
  ImageNet-val tree) is ADM-centre-cropped to 256x256, encoded and decoded; the reconstruction is
  rounded to uint8 as a saved PNG would be. rFID compares Inception features of the
  reconstructions with those of the *same* centre-cropped originals (not ADM's VIRTUAL batch, which
  is for gFID). PSNR / SSIM are on the uint8 pair, LPIPS on the [-1, 1] pair. Every number is a
  sum over images accumulated in float64, so the batch size does not change it.
* **Generation** (:func:`evaluate_generation`): samples in an ADM-layout ``.npz`` (uint8, NHWC,
  key ``arr_0``), streamed from disk. gFID against the reference file's ``mu``/``sigma`` (ADM
  ``VIRTUAL_imagenet256_labeled.npz`` or ``adm_in256_stats.npz``), Inception Score of the samples,
  and k-NN (k = 3) precision/recall (Kynkäänniemi et al. 2019) against the reference file's images
  when it has any.

Every evaluator takes a ``feature_extractor``: any callable mapping uint8 images
(N, 3, H, W) to features (N, D), or to ``{"pool": (N, D), "logits": (N, K)}``. The default is the
FID Inception-v3 (:class:`dmvae.metrics.fid.InceptionV3Features`); tests pass tiny stand-ins.

The pieces live in their own homes and are imported from there: image folders and crops in
:mod:`dmvae.image`, ADM ``.npz`` I/O in :mod:`dmvae.npz`, precision/recall in
:mod:`dmvae.metrics.precision_recall`, the latent statistics in :mod:`dmvae.latent_stats`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from dmvae._utils import eval_mode
from dmvae.checks import check_int
from dmvae.files import require_file
from dmvae.image import to_uint8
from dmvae.metrics.fid import (
    FIDStats,
    InceptionV3Features,
    StreamingStats,
    frechet_distance,
    inception_score,
    load_reference_stats,
)
from dmvae.metrics.image import psnr, ssim
from dmvae.metrics.precision_recall import precision_recall
from dmvae.latent_stats import LatentStats
from dmvae.npz import NpzKeyError, iter_npz_images, npz_image_shape

__all__ = [
    "GenerationResult",
    "ReconstructionResult",
    "compute_npz_stats",
    "evaluate_generation",
    "evaluate_reconstruction",
]

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor | Mapping[str, torch.Tensor]]


def _features(out: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalise a feature extractor's output to ``(pool (N, D), logits (N, K) or None)``."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, Mapping) and "pool" in out:
        return out["pool"], out.get("logits")
    raise TypeError(
        "a feature extractor must return a (N, D) tensor or a mapping with key 'pool' (and "
        f"optionally 'logits'), got {type(out).__name__}"
        + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else "")
    )


def _default_extractor(
    feature_extractor: FeatureExtractor | None,
    inception_weights: str | os.PathLike[str] | None,
    device: torch.device,
) -> FeatureExtractor:
    if feature_extractor is not None:
        return feature_extractor
    return InceptionV3Features(inception_weights).to(device)


# ################################################################################################
# reconstruction evaluation
# ################################################################################################


@dataclasses.dataclass
class ReconstructionResult:
    """Numbers of :func:`evaluate_reconstruction` (``to_dict()`` for JSON)."""

    num_images: int
    rfid: float | None  # None when evaluated with fid=False
    psnr: float  # dB, mean of per-image PSNR on uint8 (inf if every image is exact)
    ssim: float  # mean of per-image SSIM on uint8
    lpips: float | None  # mean of per-image LPIPS on [-1, 1]; None when no LPIPS network was given
    latents: dict[str, Any] | None  # LatentStats.summary(); None for models without encode/decode
    image_size: int
    crop: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _reconstruct(model: Any, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(reconstruction, raw latents or None) for a DMVAE-like model or a plain callable."""
    encode, decode = getattr(model, "encode", None), getattr(model, "decode", None)
    if callable(encode) and callable(decode):
        kw: dict[str, Any] = {}
        enc_params = inspect.signature(encode).parameters
        dec_params = inspect.signature(decode).parameters
        if "normalize" in enc_params and "normalize" in dec_params:
            kw["normalize"] = False  # statistics of the raw bottleneck output
        akw: dict[str, Any] = {}
        if autocast:
            if "autocast" not in enc_params or "autocast" not in dec_params:
                raise ValueError(f"autocast=True, but {type(model).__name__}.encode/decode take no autocast=")
            akw["autocast"] = True
        z = encode(x, **kw, **akw)
        return decode(z, **kw, **akw), z
    if autocast:
        raise ValueError("autocast=True needs a model with encode/decode(autocast=...) such as DMVAE")
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = getattr(out, "reconstruction", out)
    return out, None


@torch.no_grad()
def evaluate_reconstruction(
    model: Any,
    data: str | os.PathLike[str] | torch.utils.data.Dataset,
    *,
    feature_extractor: FeatureExtractor | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 32,
    num_images: int | None = None,
    image_size: int = 256,
    crop: Literal["adm", "dmvae"] = "adm",
    device: str | torch.device | None = None,
    num_workers: int = 0,
    autocast: bool = False,
    progress: bool = True,
    fid: bool = True,
) -> ReconstructionResult:
    """rFID, PSNR, SSIM, LPIPS and latent statistics of ``model`` on a folder of images.

    Args:
        model: a :class:`dmvae.DMVAE` (anything with ``encode``/``decode``; raw latents via
            ``normalize=False`` when supported) or a callable ``images -> reconstructions``, images
            (B, 3, S, S) float in [-1, 1].
        data: an image folder / ImageNet-val tree (read as a
            :class:`~dmvae.training.data.ImageFolder`), or a dataset of uint8 (3, S, S) tensors or
            of ``(image, label)`` pairs.
        feature_extractor: uint8 images -> features (see the module docstring). None = the FID
            Inception-v3 with ``inception_weights``.
        lpips: a callable ``(x, y) -> (B,)`` on [-1, 1] images, e.g. :class:`dmvae.lpips.LPIPS`.
            None = LPIPS not computed.
        batch_size: images per forward; changes no number beyond float rounding.
        num_images: evaluate this many images spread evenly over the folder (None = all).
        image_size, crop: the crop of a folder's images (:func:`dmvae.training.data.eval_transform`:
            ``"adm"``, the standard, or the reference's ``"dmvae"``); ignored for a dataset.
        device: where the model runs (default: the model's device, else CPU).
        autocast: pass ``autocast=True`` to DMVAE's encode/decode (bf16 on GPU, as the reference).
        fid: False skips rFID (no Inception network or weights needed; ``rfid`` is None).

    The model runs in eval mode; its train/eval mode is restored afterwards.
    Under ``torchrun`` (``torch.distributed`` initialised) each rank evaluates images
    ``rank, rank + world, ...`` and the sums are all-reduced: every rank returns the same result,
    equal to a single-process run.
    """
    if isinstance(data, (str, os.PathLike)):
        from dmvae.training.data import ImageFolder, eval_transform

        dataset: torch.utils.data.Dataset = ImageFolder(
            data, eval_transform(image_size, crop), labels="none", num=num_images
        )
    else:
        dataset = data
        if num_images is not None:
            n_all = len(dataset)  # type: ignore[arg-type]
            if num_images > n_all:
                raise ValueError(f"asked for {num_images} images but the dataset holds only {n_all}")
            dataset = torch.utils.data.Subset(dataset, [i * n_all // num_images for i in range(num_images)])
    batch_size = check_int("batch_size", batch_size, 1)
    if device is None:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    extractor = _default_extractor(feature_extractor, inception_weights, device) if fid else None
    from dmvae.dist import all_reduce_sum, get_rank, get_world_size

    rank, world = get_rank(), get_world_size()
    if world > 1:
        total = len(dataset)  # type: ignore[arg-type]
        if total < 2 * world:
            raise ValueError(f"{total} images cannot be split over {world} ranks (need >= 2 per rank)")
        dataset = torch.utils.data.Subset(dataset, list(range(rank, total, world)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    with eval_mode(model):
        sums, n, size, stats = _reconstruction_sums(
            model, loader, extractor, lpips, device, autocast, progress and rank == 0
        )
    real_stats, fake_stats, latent_stats = stats
    has_latents = latent_stats.count > 0
    if world > 1:  # add up the other ranks' sums (StreamingStats / LatentStats / per-image sums)
        if extractor is not None:
            real_stats.all_reduce()
            fake_stats.all_reduce()
        packed = torch.tensor([sums["psnr"], sums["ssim"], sums["lpips"], n, has_latents], dtype=torch.float64)
        totals = all_reduce_sum(packed.to(device)).cpu()
        sums = {"psnr": float(totals[0]), "ssim": float(totals[1]), "lpips": float(totals[2])}
        n, has_latents = int(totals[3]), bool(totals[4] == world)
        if has_latents:
            latent_stats.all_reduce()
    if n < 2:
        raise ValueError(f"need at least 2 images for rFID, got {n}")
    rfid = frechet_distance(*real_stats.compute(), *fake_stats.compute()) if extractor is not None else None
    return ReconstructionResult(
        num_images=n,
        rfid=rfid,
        psnr=sums["psnr"] / n,
        ssim=sums["ssim"] / n,
        lpips=sums["lpips"] / n if lpips is not None else None,
        latents=latent_stats.summary(sync=False) if has_latents else None,
        image_size=size,
        crop=crop if isinstance(data, (str, os.PathLike)) else "dataset",
    )


def _reconstruction_sums(
    model: Any,
    loader: torch.utils.data.DataLoader,
    extractor: FeatureExtractor | None,
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    device: torch.device,
    autocast: bool,
    progress: bool,
) -> tuple[dict[str, float], int, int, tuple[StreamingStats, StreamingStats, LatentStats]]:
    """One pass over ``loader``: per-image metric sums, count, image size and the statistics."""
    from tqdm.auto import tqdm

    real_stats, fake_stats, latent_stats = StreamingStats(), StreamingStats(), LatentStats()
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n = size = 0
    for batch in tqdm(loader, desc="eval-recon", unit="batch", disable=not progress):
        if isinstance(batch, (list, tuple)):  # (images, labels) of a labelled dataset
            batch = batch[0]
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected uint8 batches (B, 3, H, W), got {batch.dtype} {tuple(batch.shape)}")
        real_u8 = batch.to(device)  # (B, 3, S, S) uint8
        x = real_u8.float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        recon, z = _reconstruct(model, x, autocast)
        recon = recon.float().to(device)
        if recon.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(recon.shape)} for inputs of shape {tuple(x.shape)}")
        fake_u8 = to_uint8(recon)  # (B, 3, S, S), rounded like a saved PNG
        if extractor is not None:
            real_stats.update(_features(extractor(real_u8))[0])
            fake_stats.update(_features(extractor(fake_u8))[0])
        sums["psnr"] += psnr(real_u8, fake_u8).sum().item()
        sums["ssim"] += ssim(real_u8, fake_u8).sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(x, recon.clamp(-1, 1)).double().sum().item()
        if z is not None:
            latent_stats.update(z)
        n += batch.shape[0]
        size = int(batch.shape[-1])
    return sums, n, size, (real_stats, fake_stats, latent_stats)


# ################################################################################################
# generation evaluation
# ################################################################################################


@dataclasses.dataclass
class GenerationResult:
    """Numbers of :func:`evaluate_generation` (``to_dict()`` for JSON)."""

    num_samples: int
    fid: float
    inception_score: float | None  # None when the extractor gives no logits
    inception_score_std: float | None
    precision: float | None  # None when the reference file holds no images
    recall: float | None
    num_reference_images: int | None
    reference_stats_from: str  # "file" (mu/sigma of the reference file) or "images"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _extract_npz(
    paths: Sequence[Path],
    extractor: FeatureExtractor,
    batch_size: int,
    device: torch.device,
    *,
    keep_pool: bool,
    keep_logits: bool,
    progress: bool,
    desc: str,
) -> tuple[StreamingStats, torch.Tensor | None, torch.Tensor | None, int]:
    """Stream npz images through the extractor: statistics, optionally all pool features / logits."""
    from tqdm.auto import tqdm

    total = sum(npz_image_shape(p)[0] for p in paths)
    stats = StreamingStats()
    pools: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    n = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for p in paths:
            for chunk in iter_npz_images(p, batch_size):
                x = torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W) uint8
                pool, logit = _features(extractor(x))
                stats.update(pool)
                if keep_pool:
                    pools.append(pool.float().cpu())
                if keep_logits and logit is not None:
                    logits.append(logit.cpu())  # float32 from Inception: 200 MB for 50k
                n += x.shape[0]
                bar.update(x.shape[0])
    return stats, torch.cat(pools) if pools else None, torch.cat(logits) if logits else None, n


@torch.no_grad()
def evaluate_generation(
    samples: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    reference: str | os.PathLike[str],
    *,
    feature_extractor: FeatureExtractor | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    precision_recall_k: int | None = 3,
    is_splits: int = 10,
    progress: bool = True,
) -> GenerationResult:
    """gFID, Inception Score and precision/recall of samples in ADM ``.npz`` files.

    Args:
        samples: one ``.npz`` or a list of shards (uint8 NHWC under ``arr_0``), e.g. from
            ``dmvae sample --num-per-class 50 --npz OUT.npz``.
        reference: an ``.npz`` with ``mu``/``sigma`` (used for FID as they are) and/or ``arr_0``
            images (used for precision/recall; and for FID when there is no ``mu``/``sigma``):
            ADM's ``VIRTUAL_imagenet256_labeled.npz`` has both, ``adm_in256_stats.npz`` only the
            statistics (then precision/recall are None).
        feature_extractor: see the module docstring (default: FID Inception-v3).
        precision_recall_k: k of the k-NN manifolds; None = skip precision/recall.
        is_splits: splits of the Inception Score (10, shuffled with seed 2020, as torch-fidelity).
    """
    sample_paths = [Path(samples)] if isinstance(samples, (str, os.PathLike)) else [Path(s) for s in samples]
    if not sample_paths:
        raise ValueError("no sample files given")
    reference = require_file(reference, "reference file")
    ref_keys = _npz_keys(reference)
    has_stats = {"mu", "sigma"} <= ref_keys
    ref_stats = load_reference_stats(reference) if has_stats else None  # validated shapes
    has_images = "arr_0" in ref_keys
    if ref_stats is None and not has_images:
        raise NpzKeyError(
            f"{reference}: expected 'mu'/'sigma' statistics and/or 'arr_0' images (ADM layout), "
            f"found keys {sorted(ref_keys)}"
        )
    for p in sample_paths:
        npz_image_shape(p)  # every sample file in the ADM layout before any work
    if has_images:
        npz_image_shape(reference)
    device = torch.device(device)
    extractor = _default_extractor(feature_extractor, inception_weights, device)
    want_pr = precision_recall_k is not None and has_images

    def extract(paths: Sequence[Path], desc: str, keep_logits: bool):
        return _extract_npz(paths, extractor, batch_size, device, keep_pool=want_pr, keep_logits=keep_logits,
                            progress=progress, desc=desc)

    fake_stats, fake_pool, fake_logits, n = extract(sample_paths, "samples", keep_logits=True)
    real_pool, n_ref = None, None
    if has_images and (want_pr or ref_stats is None):
        real_stats, real_pool, _, n_ref = extract([reference], "reference", keep_logits=False)
        if ref_stats is None:
            ref_stats = real_stats.compute()
    assert ref_stats is not None
    mu, sigma = fake_stats.compute()
    if mu.shape != ref_stats.mu.shape:
        raise ValueError(
            f"sample features are {mu.shape[0]}-d but the reference statistics are "
            f"{ref_stats.mu.shape[0]}-d: "
            "was the reference computed with another feature extractor?"
        )
    fid = frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma)
    is_mean = is_std = None
    if fake_logits is not None:
        is_mean, is_std = inception_score(fake_logits, splits=min(is_splits, n))
    precision = recall = None
    if want_pr:
        assert real_pool is not None and fake_pool is not None and precision_recall_k is not None
        precision, recall = precision_recall(real_pool, fake_pool, precision_recall_k, device=device)
    return GenerationResult(
        num_samples=n,
        fid=fid,
        inception_score=is_mean,
        inception_score_std=is_std,
        precision=precision,
        recall=recall,
        num_reference_images=n_ref
        if n_ref is not None
        else (npz_image_shape(reference)[0] if has_images else None),
        reference_stats_from="file" if has_stats else "images",
    )


def _npz_keys(path: Path) -> set[str]:
    """Array names in an ``.npz`` (reads the zip directory only)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e


def compute_npz_stats(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                      feature_extractor: FeatureExtractor | None = None,
                      inception_weights: str | os.PathLike[str] | None = None, batch_size: int = 100,
                      device: str | torch.device = "cpu", progress: bool = True) -> FIDStats:
    """FID statistics of the images in ADM ``.npz`` file(s), e.g. to cache a reference set
    (``compute_npz_stats(...).save("ref_stats.npz")``)."""
    path_list = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    device = torch.device(device)
    extractor = _default_extractor(feature_extractor, inception_weights, device)
    stats, _, _, _ = _extract_npz(path_list, extractor, batch_size, device, keep_pool=False, keep_logits=False,
                                  progress=progress, desc="stats")
    return stats.compute()
