"""Safe, strict weight I/O shared by every model in the library.

What this module guarantees:

* **No pickled code is ever executed.** Reference ``.pt`` files go through
  ``torch.load(weights_only=True)``; our own files are safetensors.
* **Strict loading.** A state dict is checked against the model *before* anything is copied:
  missing keys, unexpected keys and shape mismatches are all reported in one
  :class:`CheckpointError`, and the model is left untouched.
* **Atomic writes.** Files are written to a temporary file in the destination directory and moved
  into place with ``os.replace``, so an interrupted save never leaves a half-written file behind.
* **Offline first.** Hugging Face repos are resolved through ``huggingface_hub.hf_hub_download``,
  which honours ``HF_HUB_OFFLINE=1``, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``cache_dir``.

:class:`HubMixin` adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` /
``load_weights`` to an ``nn.Module`` whose configuration is a dataclass stored as ``self.config``.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from typing_extensions import Self

__all__ = [
    "CheckpointError",
    "HubMixin",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_state_dict",
    "load_state_dict_strict",
    "read_safetensors",
    "read_torch_checkpoint",
    "resolve_hub_file",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, wrong keys or wrong shapes."""


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save tensors as safetensors, atomically. Shared storage is copied, not deduplicated."""
    from safetensors.torch import save

    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share memory; clone any that alias another entry.
    seen: set[int] = set()
    for k, v in contiguous.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            contiguous[k] = v.clone()
        elif ptr != -1:
            seen.add(ptr)
    return atomic_write_bytes(path, save(contiguous, metadata=metadata))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning corrupt or truncated files into :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
        ) from e


def read_torch_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a ``.pt`` / ``.pth`` file with ``weights_only=True`` (never executes pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        # mmap avoids holding a second copy of multi-GB release files (zip format only)
        if zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle_error_types()) as e:
        raise CheckpointError(
            f"could not read {path} with torch.load(weights_only=True): {e}. dmvae never unpickles "
            "arbitrary objects; if this file is trusted and holds more than tensors, re-save its "
            "state dicts with torch.save(state_dict) or convert it to safetensors."
        ) from e


def pickle_error_types() -> tuple[type[BaseException], ...]:
    import pickle

    return (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, OSError)


# --------------------------------------------------------------------------------------------
# strict state-dict loading
# --------------------------------------------------------------------------------------------


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` matches ``model`` key for key and shape
    for shape. Nothing is loaded."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{source}: expected a mapping of parameter names to tensors, got {type(state_dict).__name__}"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = []
    for k in sorted(set(expected) & set(state_dict)):
        v = state_dict[k]
        if not isinstance(v, torch.Tensor):
            mismatched.append(f"{k}: expected a tensor, got {type(v).__name__}")
        elif tuple(v.shape) != tuple(expected[k].shape):
            mismatched.append(
                f"{k}: expected shape {tuple(expected[k].shape)}, got {tuple(v.shape)}"
            )
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched[:20]))
        parts.append("Was the model built with the same configuration (preset) as the checkpoint?")
        raise CheckpointError("\n".join(parts))


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    assign: bool = False,
) -> None:
    """Check, then load ``state_dict`` into ``model`` (``strict=True``). On any mismatch the model
    is left exactly as it was."""
    check_state_dict(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=assign)


# --------------------------------------------------------------------------------------------
# source resolution
# --------------------------------------------------------------------------------------------


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "/", "~"))
        and not source.endswith((".pt", ".pth", ".safetensors", ".bin", ".json"))
    )


def resolve_hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path | None:
    """Path of ``filename`` in ``repo_id`` (downloaded or from the cache); ``None`` if the repo has
    no such file or it is neither cached nor downloadable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
                token=token,
            )
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------
# the mixin
# --------------------------------------------------------------------------------------------


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` / ``load_weights`` for models
    with a dataclass ``config``.

    Subclasses set ``config_class``, ``_reference_filenames`` and ``_default_use_ema`` and implement
    ``_select_reference_state_dict`` (which state dict of a reference ``.pt`` to use) and
    ``_resolve_config`` (config instance, dict or preset name -> config).
    """

    config_class: ClassVar[type]
    _reference_filenames: ClassVar[tuple[str, ...]] = ()
    _default_use_ema: ClassVar[bool] = False
    #: Preset used for a reference-format checkpoint loaded without ``config=`` (the official
    #: release ships ``.pt`` files without a config). ``None``: ``config=`` is required.
    _reference_default_config: ClassVar[str | None] = None
    config: Any

    # ---- to be provided by the model ------------------------------------------------------
    @classmethod
    def _select_reference_state_dict(
        cls, ckpt: Any, use_ema: bool, source: str
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def _resolve_config(cls, config: Any) -> Any:
        if isinstance(config, cls.config_class):
            return config
        if isinstance(config, Mapping):
            return cls.config_class.from_dict(dict(config))
        if isinstance(config, str) and hasattr(cls.config_class, "from_preset"):
            return cls.config_class.from_preset(config)
        raise TypeError(
            f"config must be a {cls.config_class.__name__}, a dict or a preset name, "
            f"got {type(config).__name__}"
        )

    # ---- saving ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (each atomically) to ``save_directory``."""
        assert isinstance(self, nn.Module)
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(
            self.state_dict(), out / WEIGHTS_NAME, metadata={"format": "pt", "library": "dmvae"}
        )
        atomic_write_text(
            out / CONFIG_NAME,
            json.dumps({"_class_name": type(self).__name__, **self.config.to_dict()}, indent=2) + "\n",
        )
        return out

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload model with dmvae",
        create_pr: bool = False,
    ) -> str:
        """Save to a temporary directory and upload it to ``repo_id``; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )
        return str(info)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def _state_dict_from_file(
        cls, path: Path, use_ema: bool
    ) -> dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        ckpt = read_torch_checkpoint(path)
        return cls._select_reference_state_dict(ckpt, use_ema, str(path))

    @classmethod
    def _locate(
        cls,
        source: str | os.PathLike[str],
        *,
        filename: str | None,
        revision: str | None,
        cache_dir: str | os.PathLike[str] | None,
        local_files_only: bool | None,
        token: str | bool | None,
    ) -> tuple[Path, Path | None]:
        """Return (weights file, config.json or None) for any supported ``source``."""
        path = Path(os.path.expanduser(str(source)))
        if path.is_dir():
            if filename is not None:
                weights = path / filename
                if not weights.is_file():
                    raise FileNotFoundError(f"{weights} not found")
                cfg = path / CONFIG_NAME
                return weights, cfg if cfg.is_file() else None
            weights = path / WEIGHTS_NAME
            if weights.is_file():
                cfg = path / CONFIG_NAME
                return weights, cfg if cfg.is_file() else None
            for name in cls._reference_filenames:
                if (path / name).is_file():
                    return path / name, None
            raise FileNotFoundError(
                f"{path} holds neither {WEIGHTS_NAME} nor a reference checkpoint "
                f"({', '.join(cls._reference_filenames) or 'none known'}); found: "
                f"{sorted(p.name for p in path.iterdir())[:20]}"
            )
        if path.is_file():
            return path, None
        src = str(source)
        if not _looks_like_repo_id(src):
            raise FileNotFoundError(
                f"{src!r} is not an existing file or directory, nor a Hugging Face repo id "
                "('owner/name')"
            )
        kw = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        try:
            if filename is not None:
                weights = resolve_hub_file(src, filename, **kw)
                if weights is None:
                    raise FileNotFoundError(f"{filename!r} not found in {src}")
                cfg = resolve_hub_file(src, CONFIG_NAME, **kw) if filename.endswith(".safetensors") else None
                return weights, cfg
            cfg = resolve_hub_file(src, CONFIG_NAME, **kw)
            if cfg is not None:
                weights = resolve_hub_file(src, WEIGHTS_NAME, **kw)
                if weights is not None:
                    return weights, cfg
            for name in cls._reference_filenames:
                weights = resolve_hub_file(src, name, **kw)
                if weights is not None:
                    return weights, None
        except FileNotFoundError:
            raise
        except Exception as e:  # network / auth / repo-not-found: make the cause readable
            raise FileNotFoundError(f"could not resolve {src!r} on the Hugging Face Hub: {e}") from e
        tried = [f"{CONFIG_NAME} + {WEIGHTS_NAME}", *cls._reference_filenames]
        where = (
            "in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
            if _offline() or local_files_only
            else "in the repository or the local cache"
        )
        raise FileNotFoundError(
            f"none of {tried} found for {src!r} {where}. Download the files first "
            f"(huggingface-cli download {src}) or pass a local path."
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        config: Any = None,
        use_ema: bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        filename: str | None = None,
    ) -> Self:
        """Build the model and load weights strictly.

        Args:
            source: one of our directories (``config.json`` + ``model.safetensors``), a
                ``.safetensors`` file, a reference-format ``.pt`` file, or a Hugging Face repo id
                (our layout first, else the reference files in ``_reference_filenames``).
            config: a config, dict or preset name. Required for weights that come without a
                ``config.json`` (reference ``.pt`` files, bare ``.safetensors``); overrides the
                stored config otherwise (the weights must still match it).
            use_ema: for reference ``.pt`` files holding both raw and EMA weights, which to load
                (``None``: the model's default). Ignored for our own files.
            device, dtype: where and in which floating dtype to put the loaded model.
            revision, cache_dir, local_files_only, token: passed to ``hf_hub_download``.
            filename: a specific file inside a directory or repo.

        The returned model is in eval mode.
        """
        weights_path, config_path = cls._locate(
            source,
            filename=filename,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        if config is not None:
            cfg = cls._resolve_config(config)
        elif config_path is not None:
            cfg = cls.config_class.load(config_path)
        elif cls._reference_default_config is not None and weights_path.suffix in (".pt", ".pth"):
            cfg = cls._resolve_config(cls._reference_default_config)
        else:
            raise ValueError(
                f"{weights_path} comes without a config.json: pass config= (a "
                f"{cls.config_class.__name__}, a dict or a preset name)"
            )
        use_ema = cls._default_use_ema if use_ema is None else use_ema
        state_dict = cls._state_dict_from_file(weights_path, use_ema)
        model = cls._build_and_load(cfg, state_dict, source=str(weights_path))
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    @classmethod
    def _build_and_load(
        cls, cfg: Any, state_dict: Mapping[str, torch.Tensor], source: str
    ) -> Self:
        """Build on the meta device (no wasted init) and assign the checkpoint tensors; fall back to
        a normal build if anything would be left on the meta device."""
        with torch.device("meta"):
            model = cls(cfg)  # type: ignore[call-arg]
        assert isinstance(model, nn.Module)
        check_state_dict(model, state_dict, source)
        reference = model.state_dict()
        cast = {
            k: v.to(reference[k].dtype) if v.is_floating_point() else v
            for k, v in state_dict.items()
        }
        model.load_state_dict(cast, strict=True, assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:  # non-persistent buffers: build for real and copy
            model = cls(cfg)  # type: ignore[call-arg]
            load_state_dict_strict(model, state_dict, source)  # type: ignore[arg-type]
        return model  # type: ignore[return-value]

    def load_weights(
        self,
        source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
        *,
        use_ema: bool | None = None,
        filename: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> Self:
        """Load weights into this model strictly; on failure the model is unchanged."""
        assert isinstance(self, nn.Module)
        if isinstance(source, Mapping):
            state_dict, name = dict(source), "state dict"
        else:
            weights_path, _ = self._locate(
                source,
                filename=filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
            use_ema = self._default_use_ema if use_ema is None else use_ema
            state_dict, name = self._state_dict_from_file(weights_path, use_ema), str(weights_path)
        load_state_dict_strict(self, state_dict, name)
        return self  # type: ignore[return-value]
