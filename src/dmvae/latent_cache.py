"""Latent cache: encode a data set once, train latent models from memory-mapped safetensors shards.

Layout of a cache directory (all files written atomically)::

    .dmvae-output.json         the marker: only a directory carrying it is ever replaced (--overwrite)
    cache.json                 format, tokenizer config, encoder hash, file-list digest, sizes, statistics
    files.txt                  the source file of sample i on line i (the "file index")
    shard-00000.safetensors    latents (n, C, h, w), latents_flip (n, C, h, w), labels (n,), index (n,);
                               metadata: encoder hash, file-list digest, shard number
    shard-00001.safetensors    ...

Samples are cut into fixed shards of ``shard_size`` consecutive indices; under torchrun rank r encodes
shards r, r + W, r + 2W, ... Each shard is written in one piece, so a run that stops (a crash, a job
time limit, ``max_shards``) leaves only complete shards, and a new run (any number of processes)
encodes exactly the missing ones: no duplicate, no gap. When every shard exists, rank 0 measures the
statistics of the un-normalised latents (global and per channel) and marks the cache complete.

Nothing is trusted because it exists: every shard is verified (file size against its header, the
tensors' names, shapes and dtypes, the encoder hash and file-list digest it records, its number) when
a run resumes (a damaged shard is re-encoded, with a warning) and when :class:`LatentDataset` opens
the cache (a damaged shard is an error naming the file). A resume over another list of input files
(names, or the sizes of the files) is refused naming the first difference; temporary files of killed
runs are removed. ``overwrite`` replaces only a directory this tool made (its marker), never an
input or a parent of one (:func:`dmvae.files.replace_output_dir`).

What is stored (as LightningDiT's ``extract_features.py``): the un-normalised ``vae.encode(x,
normalize=False)`` of the ADM centre crop ``x`` of each image and of its horizontal mirror, in float32
by default (``dtype=torch.bfloat16`` halves the size). :class:`LatentDataset` returns one of the two
at random, normalised with the tokenizer's ``latent_mean`` / ``latent_scale`` (so it equals
``vae.encode(x)``). The encoder hash (SHA-256 over every weight ``encode`` uses, i.e. all but the
decoder) identifies the tokenizer: a decoder fine-tuned in stage 4 keeps the stage-3 cache valid,
anything else is refused (:meth:`LatentDataset.check_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dmvae.dist import barrier, get_rank, get_world_size, is_main_process
from dmvae.files import (
    CheckpointError,
    atomic_save_safetensors,
    atomic_write_text,
    read_json,
    read_safetensors_header,
    replace_output_dir,
    write_marker,
)

__all__ = [
    "CACHE_FORMAT",
    "CacheInfo",
    "LatentDataset",
    "cache_latents",
    "check_cache_output",
    "encoder_hash",
    "read_cache_info",
    "verify_shard",
]

CACHE_FORMAT = "dmvae-latent-cache/1"
INFO_NAME = "cache.json"
FILES_NAME = "files.txt"
TOOL = "cache-latents"
_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_TMP_RE = re.compile(r"\.(shard-\d+\.safetensors|cache\.json|files\.txt|\.dmvae-output\.json)\..+\.tmp")
Key = Union[int, tuple[int, int]]


def encoder_hash(vae: nn.Module) -> str:
    """SHA-256 (hex) of the weights ``encode`` depends on: every state-dict entry but ``decoder.*``,
    by name, dtype, shape and bytes (independent of the device)."""
    from dmvae._utils import unwrap_model

    h = hashlib.sha256()
    for name, t in sorted(unwrap_model(vae).state_dict().items()):
        if name.startswith("decoder."):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class CacheInfo:
    """The ``cache.json`` of a latent cache."""

    num_images: int
    shard_size: int
    image_size: int
    latent_shape: list[int]  # (C, h, w)
    dtype: str
    encoder_hash: str
    tokenizer_config: dict[str, Any]
    num_classes: int
    source: str = ""
    files_digest: str = ""  # of the input list (names and file sizes, dmvae.training.data.file_list_digest)
    complete: bool = False
    statistics: dict[str, Any] = field(default_factory=dict)  # of the un-normalised latents
    format: str = CACHE_FORMAT

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_path(self, directory: Path, k: int) -> Path:
        return directory / f"shard-{k:05d}.safetensors"

    def shard_rows(self, k: int) -> tuple[int, int]:
        """The sample indices ``[lo, hi)`` of shard ``k``."""
        return k * self.shard_size, min(self.num_images, (k + 1) * self.shard_size)

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / INFO_NAME, json.dumps(asdict(self), indent=1))


def read_cache_info(directory: str | os.PathLike[str]) -> CacheInfo:
    """Read ``<directory>/cache.json``; a missing or foreign file raises with the reason."""
    directory = Path(directory)
    if not (directory / INFO_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not a latent cache (no {INFO_NAME}); make one with dmvae cache-latents")
    data = read_json(directory / INFO_NAME, "latent cache description")
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError(f"{directory / INFO_NAME}: format {data.get('format') if isinstance(data, dict) else data!r}, "
                         f"expected {CACHE_FORMAT!r}")
    known = set(CacheInfo.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{directory / INFO_NAME}: unknown fields {unknown} (made by a newer dmvae?)")
    try:
        return CacheInfo(**data)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{directory / INFO_NAME}: {e} (the file is damaged; re-run dmvae cache-latents)") from None


def verify_shard(directory: str | os.PathLike[str], info: CacheInfo, k: int) -> str | None:
    """Why shard ``k`` of the cache in ``directory`` cannot be trusted, or None when it can.

    Checked from the header alone (no tensor is loaded): the file's size against the header, the
    tensors' names, dtypes and shapes, and the metadata it records (format, encoder hash, file-list
    digest, shard number) against ``info``."""
    path = info.shard_path(Path(directory), k)
    if not path.is_file():
        return "is missing"
    try:
        header, meta = read_safetensors_header(path)
    except CheckpointError as e:
        return str(e).removeprefix(f"{path}: ")
    if meta.get("format") != CACHE_FORMAT:
        return f"has format {meta.get('format')!r}, expected {CACHE_FORMAT!r}"
    if meta.get("encoder_hash") != info.encoder_hash:
        return (f"was made by another tokenizer (encoder hash {str(meta.get('encoder_hash'))[:12]}, the cache's "
                f"{info.encoder_hash[:12]})")
    if meta.get("files_digest", "") != info.files_digest:
        return "was made from another list of input files"
    if "shard" in meta and meta["shard"] != str(k):
        return f"holds shard {meta['shard']}, not shard {k}"
    lo, hi = info.shard_rows(k)
    code = _DTYPE_CODES.get(info.dtype, info.dtype)
    want = {"latents": (code, [hi - lo, *info.latent_shape]), "latents_flip": (code, [hi - lo, *info.latent_shape]),
            "labels": ("I64", [hi - lo]), "index": ("I64", [hi - lo])}
    if set(header) != set(want):
        return f"holds tensors {sorted(header)}, expected {sorted(want)}"
    for name, (dtype, shape) in want.items():
        if header[name].get("dtype") != dtype or header[name].get("shape") != shape:
            return (f"tensor {name!r} is {header[name].get('dtype')} {header[name].get('shape')}, expected "
                    f"{dtype} {shape}")
    return None


# ################################################################################################
#                                            writing
# ################################################################################################


def _sample_sources(dataset: Dataset, n: int) -> list[Any]:
    samples = getattr(dataset, "samples", None)
    if samples is not None and len(samples) == n:
        return [s[0] for s in samples]
    return [str(i) for i in range(n)]


def _input_paths(dataset: Dataset, sources: list[Any], source: str) -> list[Path]:
    """The directories the input images lie in (and ``source``, when it is a path): what an
    ``overwrite`` must never delete."""
    found = {os.path.dirname(os.path.abspath(s)) for s in sources if isinstance(s, os.PathLike)}
    for extra in (source, getattr(dataset, "root", None)):
        if extra and os.path.exists(extra):
            found.add(os.path.abspath(extra))
    return [Path(p) for p in sorted(found)]


def _compatible(old: CacheInfo, new: CacheInfo) -> list[str]:
    keys = ("num_images", "shard_size", "image_size", "latent_shape", "dtype", "encoder_hash")

    def short(v: Any) -> Any:
        return v[:12] if isinstance(v, str) and len(v) == 64 else v

    return [f"{k}: cache {short(getattr(old, k))!r}, now {short(getattr(new, k))!r}" for k in keys
            if getattr(old, k) != getattr(new, k)]


def _files_difference(out: Path, names: list[str]) -> str:
    """The first difference between the cache's ``files.txt`` and this run's inputs, in words."""
    try:
        old = (out / FILES_NAME).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return f"{out / FILES_NAME} is missing or unreadable"
    for i, (a, b) in enumerate(zip(old, names)):
        if a != b:
            return f"{FILES_NAME} line {i + 1} is {a}, the data now has {b}"
    if len(old) != len(names):
        return f"{FILES_NAME} lists {len(old)} files, the data now has {len(names)}"
    return "the same file names, but some files changed size (images were replaced)"


def _remove_temporary_files(out: Path) -> None:
    """Temporary files of atomic writes that a killed run left behind."""
    for p in out.iterdir():
        if _TMP_RE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def check_cache_output(out_dir: str | os.PathLike[str], *, overwrite: bool, inputs: Any = ()) -> None:
    """Before any work (the CLI calls it before loading the model): ``out_dir`` is new, empty, a
    latent cache (resumed, or replaced under ``overwrite`` when incompatible), or, under
    ``overwrite``, a directory :func:`dmvae.files.replace_output_dir` may replace."""
    from dmvae.files import OutputReplaceError, replace_refusal

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or (out / INFO_NAME).is_file() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{out} exists and is not a latent cache; choose another --out "
                         "(--overwrite replaces only a cache made by dmvae cache-latents)")
    why = replace_refusal(out, tool=TOOL, inputs=inputs)
    if why is not None:
        raise OutputReplaceError(f"refusing to replace {out}: {why}; choose another --out or delete it yourself")


def _prepare_output(out: Path, info: CacheInfo, names: list[str], inputs: list[Path], overwrite: bool) -> None:
    """Rank 0: resume a compatible cache, or start a new one (replacing only a cache this tool made)."""
    if out.is_symlink() and not out.exists():
        raise FileNotFoundError(f"{out} is a dangling symbolic link; choose another --out")
    if (out / INFO_NAME).is_file():
        old = read_cache_info(out)
        diff = _compatible(old, info)
        if not diff and old.files_digest not in ("", info.files_digest):
            diff = [f"the input files changed: {_files_difference(out, names)}"]
        if diff and not overwrite:
            raise ValueError(f"{out} holds a different latent cache ({'; '.join(diff)}); "
                             "resume with the same data and settings, choose another --out, or pass --overwrite")
        if diff:
            replace_output_dir(out, tool=TOOL, inputs=inputs)
        _remove_temporary_files(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not a latent cache; choose another --out "
                             "(--overwrite replaces only a cache made by dmvae cache-latents)")
        replace_output_dir(out, tool=TOOL, inputs=inputs)
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, TOOL)
    info.save(out)
    atomic_write_text(out / FILES_NAME, "".join(s + "\n" for s in names))


@torch.no_grad()
def cache_latents(
    vae: nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike[str],
    *,
    image_size: int,
    batch_size: int = 64,
    shard_size: int = 1024,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    autocast: bool = False,
    source: str = "",
    overwrite: bool = False,
    max_shards: int | None = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> CacheInfo:
    """Encode ``dataset`` (items ``(uint8 (3, S, S), label)``, e.g. an
    :class:`~dmvae.training.data.ImageFolder` with ``center_crop_transform(S)``) into ``out_dir``.

    Call on every rank under torchrun. Resumes an existing cache of the same tokenizer, settings and
    input files (every existing shard is verified; a damaged one is re-encoded with a warning). An
    incompatible cache raises, unless ``overwrite``, which replaces only a directory made by this
    tool (never one holding the inputs). ``max_shards`` stops this process after that many new
    shards (time-limited jobs; run again to continue). Returns the cache description (its
    ``complete`` flag says whether every shard exists and verifies).
    """
    from dmvae._utils import eval_mode, unwrap_model
    from dmvae.training.data import file_list_digest, to_model_input

    model = unwrap_model(vae)
    out = Path(out_dir)
    device = next(model.parameters()).device
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the data set is empty")
    if str(dtype).replace("torch.", "") not in _DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_CODES)}, got {dtype}")
    sources = _sample_sources(dataset, n)
    names = [os.fspath(s) if isinstance(s, os.PathLike) else str(s) for s in sources]
    latent_shape = list(model.latent_shape(image_size, image_size))
    info = CacheInfo(num_images=n, shard_size=shard_size, image_size=image_size, latent_shape=latent_shape,
                     dtype=str(dtype).replace("torch.", ""), encoder_hash=encoder_hash(model),
                     tokenizer_config=model.config.to_dict(), num_classes=int(getattr(dataset, "num_classes", 1)),
                     source=source, files_digest=file_list_digest(sources))
    if is_main_process():
        _prepare_output(out, info, names, _input_paths(dataset, sources, source), overwrite)
    barrier()

    rank, world = get_rank(), get_world_size()
    mine = []
    for k in range(rank, info.num_shards, world):
        why = verify_shard(out, info, k)
        if why is not None and why != "is missing":
            warnings.warn(f"{info.shard_path(out, k)} {why}; encoding it again", stacklevel=2)
        if why is not None:
            mine.append(k)
    if max_shards is not None:
        mine = mine[:max_shards]
    bar = None
    if progress and is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine) * world, desc="cache-latents (shards)", dynamic_ncols=True)
    with eval_mode(model):  # encoding in eval mode; the model is given back in its own mode
        for k in mine:
            lo, hi = info.shard_rows(k)
            loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, num_workers=num_workers,
                                pin_memory=device.type == "cuda")
            parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flip": [], "labels": []}
            for images, labels in loader:
                x = to_model_input(images, device)
                parts["latents"].append(model.encode(x, normalize=False, autocast=autocast).to(dtype).cpu())
                parts["latents_flip"].append(
                    model.encode(torch.flip(x, dims=[-1]), normalize=False, autocast=autocast).to(dtype).cpu())
                parts["labels"].append(torch.as_tensor(labels, dtype=torch.int64))
            tensors = {k_: torch.cat(v) for k_, v in parts.items()}
            tensors["index"] = torch.arange(lo, hi, dtype=torch.int64)
            atomic_save_safetensors(tensors, info.shard_path(out, k),
                                    metadata={"format": CACHE_FORMAT, "encoder_hash": info.encoder_hash,
                                              "files_digest": info.files_digest, "shard": str(k)})
            if on_shard is not None:
                on_shard(k)
            if bar is not None:
                bar.update(world)
    if bar is not None:
        bar.close()
    barrier()
    info.complete = all(verify_shard(out, info, k) is None for k in range(info.num_shards))
    if info.complete and is_main_process():
        info.statistics = _statistics(out, info)
        info.save(out)
    barrier()
    return info


def _statistics(directory: Path, info: CacheInfo) -> dict[str, Any]:
    """Global and per-channel mean / std / scale of the un-normalised latents (both flip variants)."""
    from safetensors import safe_open

    from dmvae.latent_stats import LatentStats

    stats = LatentStats()  # exact estimator: independent of shard and batch sizes
    for k in range(info.num_shards):
        with safe_open(str(info.shard_path(directory, k)), framework="pt") as f:
            for name in ("latents", "latents_flip"):
                stats.update(f.get_tensor(name).float())
    return stats.summary(sync=False)


# ################################################################################################
#                                            reading
# ################################################################################################


class LatentDataset(Dataset):
    """The samples of a latent cache, read memory-mapped: ``(latent (C, h, w) float32, label)``.

    Args:
        directory: a complete cache (``dmvae cache-latents``).
        flip: ``"random"`` (each item is the image's or its mirror's latent with probability 1/2;
            with a ``(index, sample_seed)`` key the choice follows the seed), ``"none"``, ``"only"``.
        normalize: apply ``(z - latent_mean) * latent_scale`` (default: the tokenizer's values,
            from the cache; ``latent_mean`` / ``latent_scale`` override them).
    """

    def __init__(self, directory: str | os.PathLike[str], *, flip: str = "random", normalize: bool = True,
                 latent_mean: float | None = None, latent_scale: float | None = None) -> None:
        if flip not in ("random", "none", "only"):
            raise ValueError(f"flip must be 'random', 'none' or 'only', got {flip!r}")
        self.directory = Path(directory)
        self.info = read_cache_info(self.directory)
        if not self.info.complete:
            missing = [k for k in range(self.info.num_shards) if not self.info.shard_path(self.directory, k).is_file()]
            raise ValueError(f"latent cache {self.directory} is incomplete ({len(missing)} of {self.info.num_shards} "
                             "shards missing); run dmvae cache-latents again to finish it")
        for k in range(self.info.num_shards):  # header reads only: cheap, and nothing is trusted unread
            why = verify_shard(self.directory, self.info, k)
            if why is not None:
                raise ValueError(f"latent cache shard {self.info.shard_path(self.directory, k)} {why}; run dmvae "
                                 "cache-latents again with the same arguments to re-encode it")
        cfg = self.info.tokenizer_config
        self.flip, self.normalize = flip, normalize
        self.latent_mean = float(cfg.get("latent_mean", 0.0) if latent_mean is None else latent_mean)
        self.latent_scale = float(cfg.get("latent_scale", 1.0) if latent_scale is None else latent_scale)
        self.num_classes = self.info.num_classes
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.info.num_images

    def data_identity(self) -> str:
        """What identifies the samples (the tokenizer, the input files and the storage), for resumes."""
        files = self.info.files_digest
        if not files and (self.directory / FILES_NAME).is_file():
            files = hashlib.sha256((self.directory / FILES_NAME).read_bytes()).hexdigest()
        return hashlib.sha256(f"{self.info.encoder_hash}|{files}|{self.info.num_images}|{self.info.dtype}|"
                              f"{self.info.latent_shape}|{self.flip}".encode()).hexdigest()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own memory maps
        return {**self.__dict__, "_handles": {}}

    def _shard(self, k: int) -> Any:
        if k not in self._handles:
            from safetensors import safe_open

            from safetensors import SafetensorError

            path = self.info.shard_path(self.directory, k)
            why = verify_shard(self.directory, self.info, k)  # it may have changed since the cache was opened
            try:
                if why is None:
                    self._handles[k] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                why = f"cannot be read ({e})"
            if why is not None:
                raise ValueError(f"latent cache shard {path} {why}; run dmvae cache-latents again with the same "
                                 "arguments to re-encode it")
        return self._handles[k]

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        index, seed = (int(key), None) if not isinstance(key, (tuple, list)) else (int(key[0]), int(key[1]))
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} samples")
        k, row = divmod(index, self.info.shard_size)
        f = self._shard(k)
        if self.flip == "random":
            # a bit of a multiplicative hash of the seed (the seed's own low bits follow its position)
            use_flip = ((seed * 0x9E3779B97F4A7C15) % 2**64) >> 63 == 1 if seed is not None else bool(torch.rand(()) < 0.5)
        else:
            use_flip = self.flip == "only"
        z = f.get_slice("latents_flip" if use_flip else "latents")[row : row + 1][0].float()
        label = int(f.get_slice("labels")[row : row + 1][0])
        if self.normalize:
            z = (z - self.latent_mean) * self.latent_scale
        return z, label

    def check_tokenizer(self, vae: nn.Module, name: str = "--vae") -> None:
        """Raise ``ValueError`` unless ``vae`` encodes exactly as the tokenizer that made the cache."""
        have = encoder_hash(vae)
        if have != self.info.encoder_hash:
            raise ValueError(
                f"latent cache {self.directory} was made by a different tokenizer than {name} (encoder hash "
                f"{self.info.encoder_hash[:12]} in the cache, {have[:12]} for {name}); re-run dmvae cache-latents "
                f"with this tokenizer or pass the one that made the cache"
            )
