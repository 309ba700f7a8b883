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
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from dmvae.metrics.fid import (
    FIDStats,
    InceptionV3Features,
    StreamingStats,
    frechet_distance,
    inception_score,
)
from dmvae.metrics.image import psnr, ssim, to_uint8

__all__ = [
    "GenerationResult",
    "ImageFolderDataset",
    "LatentChannelStats",
    "ReconstructionResult",
    "center_crop_adm",
    "compute_npz_stats",
    "evaluate_generation",
    "evaluate_reconstruction",
    "iter_npz_images",
    "list_images",
    "load_npz_images",
    "npz_image_shape",
    "precision_recall",
    "resize_center_crop",
    "save_npz_images",
]

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor | Mapping[str, torch.Tensor]]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


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
# image folders and the centre crops
# ################################################################################################


def center_crop_adm(image: Image.Image, image_size: int = 256) -> np.ndarray:
    """ADM's ``center_crop_arr`` (:func:`dmvae.image.center_crop_arr`) as (H, W, 3) uint8.

    Halve with BOX filtering while the short side is at least 2x the target, resize so the short
    side equals ``image_size`` with BICUBIC (long side ``round(long * scale)``), then take the
    centre (offsets ``(dim - image_size) // 2``). The standard crop for ImageNet rFID and the ADM
    reference batches.
    """
    from dmvae.image import center_crop_arr

    return np.array(center_crop_arr(image.convert("RGB"), image_size), dtype=np.uint8)  # writable copy


def resize_center_crop(image: Image.Image, image_size: int = 256, resize_ratio: float = 1.5) -> np.ndarray:
    """The DMVAE reference's validation transform: short side to ``int(resize_ratio * image_size)``
    (384 for 256) with LANCZOS (torchvision ``Resize``: long side ``int(size * long / short)``), then
    torchvision ``CenterCrop`` (offsets ``round((dim - image_size) / 2)``). (H, W, 3) uint8.

    This is *not* ADM's crop: it keeps less of the image (a 2/3 centre window) and so gives lower
    rFIDs than :func:`center_crop_adm`. Use it only to reproduce the reference's training-time numbers.
    """
    image = image.convert("RGB")
    w, h = image.size
    short = int(resize_ratio * image_size)
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    arr = np.asarray(image)
    top = int(round((arr.shape[0] - image_size) / 2.0))
    left = int(round((arr.shape[1] - image_size) / 2.0))
    return arr[top : top + image_size, left : left + image_size].copy()  # writable, contiguous


def list_images(root: str | os.PathLike[str], num: int | None = None) -> list[Path]:
    """All images under ``root`` (recursive: a flat folder or an ImageNet ``val/<wnid>/*.JPEG``
    tree), sorted by relative path. ``num`` picks ``num`` of them spread evenly over that order
    (index ``i * total // num``), so a subset covers every class folder and is the same on
    every run and for every batch size."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    if num is not None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if num > len(files):
            raise ValueError(f"asked for {num} images but {root} holds only {len(files)}")
        files = [files[i * len(files) // num] for i in range(num)]
    return files


class ImageFolderDataset(torch.utils.data.Dataset):
    """Centre-cropped images of a folder as uint8 tensors (3, S, S).

    Args:
        root: a folder of images or an ImageNet-val tree (see :func:`list_images`).
        image_size: S.
        crop: ``"adm"`` (:func:`center_crop_adm`, the standard) or ``"dmvae"``
            (:func:`resize_center_crop`, the reference's resize-384 + centre crop).
        num: evaluate ``num`` images spread evenly over the sorted list (None = all).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 256,
        crop: Literal["adm", "dmvae"] = "adm",
        num: int | None = None,
    ) -> None:
        if crop not in ("adm", "dmvae"):
            raise ValueError(f"crop must be 'adm' or 'dmvae', got {crop!r}")
        self.files = list_images(root, num)
        self.image_size = image_size
        self.crop = crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as im:
            arr = (
                center_crop_adm(im, self.image_size)
                if self.crop == "adm"
                else resize_center_crop(im, self.image_size)
            )
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, S, S) uint8


# ################################################################################################
# reconstruction evaluation
# ################################################################################################


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a CPU tensor over ranks (moved to ``device`` for the collective: NCCL needs CUDA)."""
    import torch.distributed as dist

    on_device = t.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


class LatentChannelStats:
    """Streaming per-channel mean/std of latents for evaluation reports, float64 sums
    (batch-size independent). To estimate and write ``latent_mean`` / ``latent_scale`` into a model
    during training, use :class:`dmvae.training.LatentStats`.

    ``update(z)`` takes (B, C, H, W) grids or (B, N, C) token sequences. These are the statistics
    behind ``latent_mean`` / ``latent_scale``: the reference instead averages per-batch means and
    per-batch ``1 / std``, which depends on the batch size; here ``std`` is that of all elements.
    """

    def __init__(self) -> None:
        self.n = 0  # elements per channel
        self.s: torch.Tensor | None = None  # (C,) sum
        self.ss: torch.Tensor | None = None  # (C,) sum of squares

    def update(self, z: torch.Tensor) -> LatentChannelStats:
        if z.dim() == 4:
            flat = z.detach().double().transpose(0, 1).reshape(z.shape[1], -1)  # (C, B*H*W)
        elif z.dim() == 3:
            flat = z.detach().double().reshape(-1, z.shape[-1]).T  # (C, B*N)
        else:
            raise ValueError(f"latents must be (B, C, H, W) or (B, N, C), got shape {tuple(z.shape)}")
        if self.s is None:
            self.s = torch.zeros(flat.shape[0], dtype=torch.float64)
            self.ss = torch.zeros(flat.shape[0], dtype=torch.float64)
        assert self.s is not None and self.ss is not None
        if flat.shape[0] != self.s.shape[0]:
            raise ValueError(f"latents have {flat.shape[0]} channels, earlier batches had {self.s.shape[0]}")
        flat = flat.cpu()
        self.n += flat.shape[1]
        self.s += flat.sum(dim=1)
        self.ss += (flat * flat).sum(dim=1)
        return self

    def all_reduce(self, device: torch.device | str = "cpu") -> LatentChannelStats:
        """Sum the accumulators of all ranks (every rank must have recorded latents)."""
        if self.s is None or self.ss is None:
            raise ValueError("all_reduce needs the channel count: update() at least once first")
        packed = _all_reduce_sum(
            torch.cat([self.s, self.ss, torch.tensor([float(self.n)], dtype=torch.float64)]),
            torch.device(device),
        )
        c = self.s.shape[0]
        self.s, self.ss, self.n = packed[:c].clone(), packed[c : 2 * c].clone(), int(round(float(packed[-1])))
        return self

    def compute(self) -> dict[str, Any]:
        """Per-channel and global mean and (unbiased) std, plus ``scale = 1 / std``."""
        if self.s is None or self.ss is None or self.n < 2:
            raise ValueError("no latents were recorded")
        c = self.s.shape[0]
        mean = self.s / self.n
        var = ((self.ss - self.n * mean * mean) / (self.n - 1)).clamp_min(0)
        total = self.n * c
        g_mean = self.s.sum() / total
        g_var = ((self.ss.sum() - total * g_mean * g_mean) / (total - 1)).clamp_min(0)
        return {
            "latent_channels": c,
            "latent_mean": float(g_mean),
            "latent_std": float(g_var.sqrt()),
            "latent_scale": float(1.0 / g_var.sqrt()) if g_var > 0 else math.inf,
            "latent_channel_mean": [float(v) for v in mean],
            "latent_channel_std": [float(v) for v in var.sqrt()],
        }


@dataclasses.dataclass
class ReconstructionResult:
    """Numbers of :func:`evaluate_reconstruction` (``to_dict()`` for JSON)."""

    num_images: int
    rfid: float
    psnr: float  # dB, mean of per-image PSNR on uint8 (inf if every image is exact)
    ssim: float  # mean of per-image SSIM on uint8
    lpips: float | None  # mean of per-image LPIPS on [-1, 1]; None when no LPIPS network was given
    latents: dict[str, Any] | None  # LatentChannelStats.compute(); None for models without encode/decode
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
) -> ReconstructionResult:
    """rFID, PSNR, SSIM, LPIPS and latent statistics of ``model`` on a folder of images.

    Args:
        model: a :class:`dmvae.DMVAE` (anything with ``encode``/``decode``; raw latents via
            ``normalize=False`` when supported) or a callable ``images -> reconstructions``, images
            (B, 3, S, S) float in [-1, 1].
        data: an image folder / ImageNet-val tree, or a dataset of uint8 (3, S, S) tensors.
        feature_extractor: uint8 images -> features (see the module docstring). None = the FID
            Inception-v3 with ``inception_weights``.
        lpips: a callable ``(x, y) -> (B,)`` on [-1, 1] images, e.g. :class:`dmvae.lpips.LPIPS`.
            None = LPIPS not computed.
        batch_size: images per forward; changes no number beyond float rounding.
        num_images: evaluate this many images spread evenly over the folder (None = all).
        image_size, crop: see :class:`ImageFolderDataset` (ignored for a dataset).
        device: where the model runs (default: the model's device, else CPU).
        autocast: pass ``autocast=True`` to DMVAE's encode/decode (bf16 on GPU, as the reference).

    Under ``torchrun`` (``torch.distributed`` initialised) each rank evaluates images
    ``rank, rank + world, ...`` and the sums are all-reduced: every rank returns the same result,
    equal to a single-process run.
    """
    if isinstance(data, (str, os.PathLike)):
        dataset: torch.utils.data.Dataset = ImageFolderDataset(
            data, image_size=image_size, crop=crop, num=num_images
        )
    else:
        dataset = data
        if num_images is not None:
            n_all = len(dataset)  # type: ignore[arg-type]
            if num_images > n_all:
                raise ValueError(f"asked for {num_images} images but the dataset holds only {n_all}")
            dataset = torch.utils.data.Subset(dataset, [i * n_all // num_images for i in range(num_images)])
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    if isinstance(model, torch.nn.Module):
        model.eval()
    extractor = _default_extractor(feature_extractor, inception_weights, device)
    rank, world = _dist_rank_world()
    if world > 1:
        total = len(dataset)  # type: ignore[arg-type]
        if total < 2 * world:
            raise ValueError(f"{total} images cannot be split over {world} ranks (need >= 2 per rank)")
        dataset = torch.utils.data.Subset(dataset, list(range(rank, total, world)))

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    real_stats, fake_stats, latent_stats = StreamingStats(), StreamingStats(), LatentChannelStats()
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n = 0
    has_latents = False
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="eval-recon", unit="batch", disable=not progress or rank != 0):
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected uint8 batches (B, 3, H, W), got {batch.dtype} {tuple(batch.shape)}")
        real_u8 = batch.to(device)  # (B, 3, S, S) uint8
        x = real_u8.float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        recon, z = _reconstruct(model, x, autocast)
        recon = recon.float().to(device)
        if recon.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(recon.shape)} for inputs of shape {tuple(x.shape)}"
            )
        fake_u8 = to_uint8(recon)  # (B, 3, S, S), rounded like a saved PNG

        real_stats.update(_features(extractor(real_u8))[0])
        fake_stats.update(_features(extractor(fake_u8))[0])
        sums["psnr"] += psnr(real_u8, fake_u8).sum().item()
        sums["ssim"] += ssim(real_u8, fake_u8).sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(x, recon.clamp(-1, 1)).double().sum().item()
        if z is not None:
            latent_stats.update(z)
            has_latents = True
        n += batch.shape[0]
        size = int(batch.shape[-1])

    if world > 1:  # add up the other ranks' sums (StreamingStats / LatentChannelStats / per-image sums)
        real_stats.all_reduce()
        fake_stats.all_reduce()
        totals = _all_reduce_sum(
            torch.tensor([sums["psnr"], sums["ssim"], sums["lpips"], n, has_latents], dtype=torch.float64),
            device,
        )
        sums = {"psnr": float(totals[0]), "ssim": float(totals[1]), "lpips": float(totals[2])}
        n, has_latents = int(totals[3]), bool(totals[4] == world)
        if has_latents:
            latent_stats.all_reduce(device)
    if n < 2:
        raise ValueError(f"need at least 2 images for rFID, got {n}")
    rfid = frechet_distance(*real_stats.compute(), *fake_stats.compute())
    return ReconstructionResult(
        num_images=n,
        rfid=rfid,
        psnr=sums["psnr"] / n,
        ssim=sums["ssim"] / n,
        lpips=sums["lpips"] / n if lpips is not None else None,
        latents=latent_stats.compute() if has_latents else None,
        image_size=size,
        crop=crop if isinstance(data, (str, os.PathLike)) else "dataset",
    )


# ################################################################################################
# ADM .npz files: uint8, NHWC, key arr_0
# ################################################################################################


def _check_nhwc_uint8(images: np.ndarray, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{what}: expected uint8 images of shape (N, H, W, 3) (ADM layout), "
            f"got {images.dtype} {images.shape}"
        )


def save_npz_images(
    path: str | os.PathLike[str],
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write images in the ADM evaluator's layout: uncompressed ``.npz``, ``arr_0`` = uint8 (N, H, W, 3)
    (and ``arr_1`` = int64 labels, as ADM's ``image_sample.py`` writes for class-conditional runs).

    ``images`` may be a uint8 NHWC array, or a torch tensor (N, 3, H, W) uint8 or float in [-1, 1]
    (rounded with :func:`dmvae.metrics.image.to_uint8`). The file appears atomically (temporary file
    in the same folder, then ``os.replace``), so an interrupted write never leaves a truncated npz.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
        images = to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    images = np.ascontiguousarray(images)
    _check_nhwc_uint8(images, "save_npz_images")
    arrays: dict[str, np.ndarray] = {"arr_0": images}
    if labels is not None:
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {lab.shape}")
        arrays["arr_1"] = lab.astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def _open_npz_member(path: Path, key: str) -> Iterator[tuple[Any, tuple[int, ...], np.dtype]]:
    """Open ``key`` of an ``.npz`` as a stream positioned at the array data: (file, shape, dtype)."""
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable .npz file (corrupt or truncated?): {e}") from e
    with zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key not in names:
            raise KeyError(
                f"{path}: expected images under key {key!r} (ADM layout), found keys {sorted(names)}"
            )
        with zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}:{key}: expected a C-ordered numeric array")
            yield f, tuple(shape), dtype


def npz_image_shape(path: str | os.PathLike[str], key: str = "arr_0") -> tuple[int, ...]:
    """Shape of the image array in an ADM ``.npz`` without reading the images."""
    with _open_npz_member(Path(path), key) as (_, shape, _dtype):
        return shape


def iter_npz_images(
    path: str | os.PathLike[str], batch_size: int = 256, key: str = "arr_0"
) -> Iterator[np.ndarray]:
    """Stream the images of an ADM ``.npz`` in chunks of (<= batch_size, H, W, 3) uint8, reading the
    file sequentially (50k 256x256 images are 9.8 GB; they never sit in memory at once)."""
    path = Path(path)
    with _open_npz_member(path, key) as (f, shape, dtype):
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(
                f"{path}:{key}: expected uint8 images (N, H, W, 3) (ADM layout), got {dtype} {shape}"
            )
        per_image = int(np.prod(shape[1:]))
        remaining = shape[0]
        while remaining > 0:
            b = min(batch_size, remaining)
            buf = f.read(b * per_image)
            if len(buf) != b * per_image:
                raise ValueError(
                    f"{path}:{key} is truncated "
                    f"({shape[0] - remaining + len(buf) // per_image} of {shape[0]} images)"
                )
            yield np.frombuffer(buf, dtype=np.uint8).reshape((b, *shape[1:]))
            remaining -= b


def load_npz_images(path: str | os.PathLike[str], key: str = "arr_0") -> np.ndarray:
    """All images of an ADM ``.npz`` as one uint8 (N, H, W, 3) array (small files; else use
    :func:`iter_npz_images`). Nothing is unpickled."""
    chunks = list(iter_npz_images(path, batch_size=1 << 30, key=key))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


# ################################################################################################
# generation evaluation
# ################################################################################################


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
    reference = Path(reference)
    if not reference.is_file():
        raise FileNotFoundError(f"reference file not found: {reference}")
    try:
        with np.load(reference, allow_pickle=False) as f:
            ref_keys = set(f.files)
            ref_stats = (
                FIDStats(np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64))
                if {"mu", "sigma"} <= ref_keys
                else None
            )
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{reference} is not a readable .npz file: {e}") from e
    has_images = "arr_0" in ref_keys
    if ref_stats is None and not has_images:
        raise KeyError(
            f"{reference}: expected 'mu'/'sigma' statistics and/or 'arr_0' images (ADM layout), "
            f"found keys {sorted(ref_keys)}"
        )
    device = torch.device(device)
    extractor = _default_extractor(feature_extractor, inception_weights, device)
    want_pr = precision_recall_k is not None and has_images

    fake_stats, fake_pool, fake_logits, n = _extract_npz(
        sample_paths,
        extractor,
        batch_size,
        device,
        keep_pool=want_pr,
        keep_logits=True,
        progress=progress,
        desc="samples",
    )
    real_pool, n_ref = None, None
    if has_images and (want_pr or ref_stats is None):
        real_stats, real_pool, _, n_ref = _extract_npz(
            [reference],
            extractor,
            batch_size,
            device,
            keep_pool=want_pr,
            keep_logits=False,
            progress=progress,
            desc="reference",
        )
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
        reference_stats_from="file" if {"mu", "sigma"} <= ref_keys else "images",
    )


def compute_npz_stats(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    feature_extractor: FeatureExtractor | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FIDStats:
    """FID statistics of the images in ADM ``.npz`` file(s), e.g. to cache a reference set
    (``compute_npz_stats(...).save("ref_stats.npz")``)."""
    path_list = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    device = torch.device(device)
    extractor = _default_extractor(feature_extractor, inception_weights, device)
    stats, _, _, _ = _extract_npz(
        path_list,
        extractor,
        batch_size,
        device,
        keep_pool=False,
        keep_logits=False,
        progress=progress,
        desc="stats",
    )
    return stats.compute()
