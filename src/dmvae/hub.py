"""Strict model loading and saving shared by every model in the library.

What this module guarantees (file I/O itself lives in :mod:`dmvae.files`, sources in :mod:`dmvae.sources`):

* **No pickled code is ever executed.** Reference ``.pt`` files go through
  ``torch.load(weights_only=True)``; our own files are safetensors.
* **Strict loading.** A state dict is checked against the model *before* anything is copied:
  missing keys, unexpected keys, shape mismatches and values of the wrong kind (integer or
  complex where the model has floats, meta tensors) are all reported in one
  :class:`CheckpointError`, and the model is left untouched.
* **Atomic writes.** Every file is written to a temporary file and renamed into place, with the
  normal permissions under the umask.
* **Offline first.** Hugging Face repos are resolved through ``huggingface_hub``; when the Hub is
  unreachable (or ``HF_HUB_OFFLINE=1``) only the local cache is read, and a missing source fails
  within seconds naming both the local path and the Hub repo that were tried.

:class:`HubMixin` adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` /
``load_weights`` to an ``nn.Module`` whose configuration is a dataclass stored as ``self.config``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from typing_extensions import Self

from dmvae.convert import select_state_dict
from dmvae.files import (
    CheckpointError,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    read_safetensors,
    read_torch_checkpoint,
)
from dmvae.sources import locate, resolve_hub_file

__all__ = ["CONFIG_NAME", "MAX_PARAMETERS", "WEIGHTS_NAME", "ConfigTooLargeError", "HubMixin", "build_limits",
           "check_config_size", "check_state_dict", "load_state_dict_strict"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------------------------
# strict state-dict loading
# --------------------------------------------------------------------------------------------


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _dtype_problem(expected: torch.Tensor, got: torch.Tensor) -> str | None:
    """Why ``got`` cannot be loaded into ``expected`` (None if it can). Floating dtypes convert
    into each other; integer / bool / complex values never silently become floats (or back)."""
    if got.is_meta:
        return "is on the meta device (it holds no data)"
    if got.is_complex() and not expected.is_complex():
        return f"is complex ({got.dtype}); expected real {expected.dtype} values"
    if expected.is_floating_point() != got.is_floating_point():
        kind = "floating-point" if expected.is_floating_point() else "integer"
        return f"has dtype {got.dtype}; expected {kind} values ({expected.dtype})"
    return None


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` matches ``model`` key for key, shape
    for shape and in dtype kind (float / integer / complex; no meta tensors). Nothing is loaded."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{source}: expected a mapping of parameter names to tensors, got {type(state_dict).__name__}"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched, bad_values = [], []
    for k in sorted(set(expected) & set(state_dict)):
        v = state_dict[k]
        if not isinstance(v, torch.Tensor):
            mismatched.append(f"{k}: expected a tensor, got {type(v).__name__}")
        elif tuple(v.shape) != tuple(expected[k].shape):
            mismatched.append(f"{k}: expected shape {tuple(expected[k].shape)}, got {tuple(v.shape)}")
        elif (problem := _dtype_problem(expected[k], v)) is not None:
            bad_values.append(f"{k} {problem}")
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched[:20]))
        if bad_values:
            parts.append(f"  unloadable values ({len(bad_values)}):\n    " + "\n    ".join(bad_values[:20]))
        parts.append("Was the model built with the same configuration (preset) as the checkpoint?")
        raise CheckpointError("\n".join(parts))
    if bad_values:
        raise CheckpointError(
            f"{source} cannot be loaded into {type(model).__name__} ({len(bad_values)} tensor(s)):\n    "
            + "\n    ".join(bad_values[:20])
        )


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


def _check_dtype_arg(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return dtype


# --------------------------------------------------------------------------------------------
# configs checked before they build: a bounded build on the meta device
# --------------------------------------------------------------------------------------------

#: The most parameters (elements) a config may build when there are no weights to compare it with
#: (``from_config``); the caller can raise it with ``max_parameters=``.
MAX_PARAMETERS = 20_000_000_000
#: The most submodules such a build may create (a huge ``depth`` of tiny blocks).
MAX_MODULES = 20_000


class ConfigTooLargeError(CheckpointError):
    """A configuration that would build a model larger than its weights (the config does not match
    the checkpoint), or than the stated limit. A :class:`~dmvae.files.CheckpointError`, so a caller
    that catches unloadable checkpoints catches this too."""


@contextlib.contextmanager
def build_limits(max_parameters: int, max_modules: int, what: str) -> Iterator[None]:
    """Stop any model construction inside the block as soon as it registers more than
    ``max_parameters`` parameter / buffer elements or ``max_modules`` submodules
    (:class:`ConfigTooLargeError`, ending in ``what``: why the limit holds and how to raise it).
    Meant for builds on the meta device, where the count costs nothing and an oversized config
    (``depth`` 20,000) is refused after the blocks beyond the limit, not after hours."""
    from torch.nn.modules import module as module_hooks

    count = {"elements": 0, "modules": 0}

    def on_tensor(module: nn.Module, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            count["elements"] += value.numel()
            if count["elements"] > max_parameters:
                raise ConfigTooLargeError(f"the configuration builds more than {max_parameters:,} parameters "
                                          f"(stopped at {type(module).__name__}.{name}); {what}")

    def on_module(module: nn.Module, name: str, _sub: Any) -> None:
        count["modules"] += 1
        if count["modules"] > max_modules:
            raise ConfigTooLargeError(f"the configuration builds more than {max_modules:,} modules "
                                      f"(stopped at {type(module).__name__}.{name}); {what}")

    handles = [module_hooks.register_module_parameter_registration_hook(on_tensor),
               module_hooks.register_module_buffer_registration_hook(on_tensor),
               module_hooks.register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_config_size(model_class: type, cfg: Any, max_parameters: int = MAX_PARAMETERS,
                      max_modules: int = MAX_MODULES) -> int:
    """Build ``model_class(cfg)`` on the meta device under :func:`build_limits`; return its
    parameter count, or raise :class:`ConfigTooLargeError` naming the limit and how to raise it."""
    with torch.device("meta"), build_limits(
        max_parameters, max_modules,
        f"refusing to build {model_class.__name__} from this config (raise max_parameters= / max_modules= "
        "if it is meant)",
    ):
        model = model_class(cfg)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# the mixin
# --------------------------------------------------------------------------------------------


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` / ``load_weights`` for models
    with a dataclass ``config``.

    Subclasses set ``config_class``, ``_reference_filenames`` and either ``_reference_layout`` (a
    :class:`dmvae.convert.ReferenceLayout`, which also gives the EMA default) or
    ``_default_use_ema`` plus their own ``_select_reference_state_dict``.
    """

    config_class: ClassVar[type]
    _reference_filenames: ClassVar[tuple[str, ...]] = ()
    _reference_layout: ClassVar[Any] = None
    _default_use_ema: ClassVar[bool] = False
    #: Preset used for a reference-format checkpoint loaded without ``config=`` (the official
    #: release ships ``.pt`` files without a config). ``None``: ``config=`` is required.
    _reference_default_config: ClassVar[str | None] = None
    config: Any

    # ---- hooks -----------------------------------------------------------------------------
    @classmethod
    def _select_reference_state_dict(
        cls, ckpt: Any, use_ema: bool | None, source: str
    ) -> dict[str, torch.Tensor]:
        """Which state dict of a reference ``.pt`` to load (see :mod:`dmvae.convert`); ``use_ema``
        None = the layout's default."""
        if cls._reference_layout is None:
            raise NotImplementedError(f"{cls.__name__} reads no reference checkpoints")
        return select_state_dict(cls._reference_layout, ckpt, use_ema, source)

    @classmethod
    def _resolve_config(cls, config: Any) -> Any:
        """A config instance from a config, a dict of fields or a preset name."""
        from dmvae._config import resolve_config

        return resolve_config(cls.config_class, config)

    # ---- saving ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (each atomically, weights first) to
        ``save_directory``. The config is written by the config itself (``config.to_json()``)."""
        assert isinstance(self, nn.Module)
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"save_pretrained: {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(
            self.state_dict(), out / WEIGHTS_NAME, metadata={"format": "pt", "library": "dmvae"}
        )
        self.config.save(out / CONFIG_NAME)
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
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message, create_pr=create_pr)
        return str(info)

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Number of parameters (``only_trainable``: those with ``requires_grad``)."""
        assert isinstance(self, nn.Module)
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def _state_dict_from_file(
        cls, path: Path, use_ema: bool | None
    ) -> dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        if use_ema is None and cls._reference_layout is None:  # layouts resolve None themselves
            use_ema = cls._default_use_ema
        return cls._select_reference_state_dict(read_torch_checkpoint(path), use_ema, str(path))

    @classmethod
    def _locate(cls, source: str | os.PathLike[str], *, filename: str | None, revision: str | None = None,
                cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool | None = None,
                token: str | bool | None = None) -> tuple[Path, Path | None]:
        """Return (weights file, config.json or None) for any supported ``source``
        (see :func:`dmvae.sources.locate`)."""
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"source must be a path, a Hugging Face repo id or 'hf://owner/name', got {type(source).__name__}"
            )
        loc = locate(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                     token=token)
        if loc.is_file:
            assert loc.local is not None
            return loc.local, None
        filename = filename or loc.filename
        if filename is not None:
            weights = loc.find(filename)
            if weights is None:
                raise loc.not_found([filename])
            cfg = loc.find(CONFIG_NAME) if filename.endswith(".safetensors") else None
            return weights, cfg
        try:
            cfg = loc.find(CONFIG_NAME)
            weights = loc.find(WEIGHTS_NAME) if cfg is not None or loc.local is not None else None
            if weights is not None:
                return weights, cfg
            for name in cls._reference_filenames:
                if (weights := loc.find(name)) is not None:
                    return weights, None
        except OSError:
            raise
        except Exception as e:  # network / auth / repo-not-found: make the cause readable
            raise FileNotFoundError(f"could not resolve {os.fspath(source)!r} on the Hugging Face Hub: {e}") from e
        raise loc.not_found([f"{CONFIG_NAME} + {WEIGHTS_NAME}", *cls._reference_filenames])

    @classmethod
    def _config_for(cls, config: Any, config_path: Path | None, weights_path: Path) -> Any:
        if config is not None:
            return cls._resolve_config(config)
        if config_path is not None:
            return cls.config_class.load(config_path)
        if cls._reference_default_config is not None and weights_path.suffix in (".pt", ".pth"):
            return cls._resolve_config(cls._reference_default_config)
        raise ValueError(
            f"{weights_path} comes without a config.json: pass config= (a "
            f"{cls.config_class.__name__}, a dict or a preset name)"
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
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        filename: str | None = None,
    ) -> Self:
        """Build the model and load weights strictly.

        Args:
            source: one of our directories (``config.json`` + ``model.safetensors``), a
                ``.safetensors`` file, a reference-format ``.pt`` file, a Hugging Face repo id
                ``owner/name`` or ``hf://owner/name[/file]`` (our layout first, else the reference
                files in ``_reference_filenames``). A path that does not exist locally is looked up
                on the Hub; when the Hub is unreachable only the cache is used (fails in seconds).
            config: a config, dict or preset name. Required for weights that come without a
                ``config.json`` (reference ``.pt`` files, bare ``.safetensors``); overrides the
                stored config otherwise (the weights must still match it).
            use_ema: for reference ``.pt`` files holding both raw and EMA weights, which to load
                (``None``: the model's default, see :mod:`dmvae.convert`). Ignored for our files.
            device, dtype: where and in which floating dtype to put the loaded model.
                ``torch_dtype`` is an alias of ``dtype`` (the diffusers spelling).
            revision, cache_dir, local_files_only, token: passed to ``hf_hub_download``.
            filename: a specific file inside a directory or repo.

        The returned model is in eval mode. Integer, complex or meta tensors where the model has
        floating-point weights are refused (:class:`CheckpointError`), as in :meth:`load_weights`.
        """
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
        dtype = _check_dtype_arg(dtype if dtype is not None else torch_dtype)
        weights_path, config_path = cls._locate(source, filename=filename, revision=revision, cache_dir=cache_dir,
                                                local_files_only=local_files_only, token=token)
        cfg = cls._config_for(config, config_path, weights_path)
        state_dict = cls._state_dict_from_file(weights_path, use_ema)
        model = cls._build_and_load(cfg, state_dict, source=str(weights_path))
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    @classmethod
    def from_state_dict(cls, config: Any, state_dict: Mapping[str, torch.Tensor], *,
                        source: str = "state dict") -> Self:
        """A model of ``config`` (a config, a dict or a preset name) holding exactly
        ``state_dict``: every key, shape and dtype kind must match (``CheckpointError`` names the
        differences and ``source``)."""
        return cls._build_and_load(cls._resolve_config(config), state_dict, source=source)

    @classmethod
    def from_config(cls, config: Any, *, max_parameters: int = MAX_PARAMETERS, **overrides: Any) -> Self:
        """A randomly initialised model of ``config`` (a config, a dict of fields or a preset name),
        with field ``overrides``: ``DMVAE.from_config("dmvae-tiny", image_size=64)``. The config is
        first built on the meta device and refused above ``max_parameters`` (:func:`check_config_size`)."""
        cfg = cls._resolve_config(config)
        cfg = cfg.replace(**overrides) if overrides else cfg
        check_config_size(cls, cfg, max_parameters)
        return cls(cfg)  # type: ignore[call-arg]

    @classmethod
    def _build_and_load(
        cls, cfg: Any, state_dict: Mapping[str, torch.Tensor], source: str
    ) -> Self:
        """Build on the meta device (no wasted init) and assign the checkpoint tensors; fall back to
        a normal build if anything would be left on the meta device. The build stops as soon as the
        config creates clearly more than the weights hold (a config bomb is refused in seconds)."""
        held = sum(v.numel() for v in state_dict.values() if isinstance(v, torch.Tensor))
        limit_elements = held + held // 4 + 1_000_000
        limit_modules = 4 * len(state_dict) + 1000
        with torch.device("meta"), build_limits(
            limit_elements, limit_modules,
            f"{source} holds {held:,} values in {len(state_dict)} tensors: the config does not match the weights "
            "(check depth / width fields of config.json)",
        ):
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

    def load_weights(self, source: str | os.PathLike[str] | Mapping[str, torch.Tensor], *, use_ema: bool | None = None,
                     filename: str | None = None, revision: str | None = None,
                     cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool | None = None,
                     token: str | bool | None = None) -> Self:
        """Load weights into this model strictly. Every tensor is checked (keys, shapes, dtype
        kind, no meta tensors) before the first one is copied: on failure the model is unchanged."""
        assert isinstance(self, nn.Module)
        if isinstance(source, Mapping):
            state_dict, name = dict(source), "state dict"
        else:
            weights_path, _ = self._locate(source, filename=filename, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only, token=token)
            state_dict, name = self._state_dict_from_file(weights_path, use_ema), str(weights_path)
        load_state_dict_strict(self, state_dict, name)
        return self  # type: ignore[return-value]
