"""Reference checkpoints: what kind they are and which state dict to take (pure functions).

The reference code saves two layouts (read with ``torch.load(weights_only=True)``):

========================  ====================================  =======================  ===========
layout                    top-level keys                        model                    default
========================  ====================================  =======================  ===========
autoencoder (``vae.pt``)  ``vae_wo_ddp`` (raw), ``vae_ema``      :class:`~dmvae.DMVAE`     raw
LatentDiT (``ep*.pt``)    ``model`` (raw), ``ema``               :class:`~dmvae.LatentDiT` EMA
========================  ====================================  =======================  ===========

The defaults are the ones the release is used with: the released ``vae.pt`` is evaluated with
its raw weights (every reference checkpoint has ``vae_wo_ddp``; ``vae_ema`` is optional), and the
released generators are sampled with their EMA weights. ``DMVAE.from_pretrained``,
``LatentDiT.from_pretrained``, ``dmvae sample`` and ``dmvae convert`` all take these defaults, so a
converted directory holds the same weights a direct load would use.

:func:`convert_checkpoint` turns a reference file into one of our directories
(``config.json`` + ``model.safetensors``); ``dmvae convert`` is a thin wrapper around it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from dmvae.files import CheckpointError

__all__ = [
    "AUTOENCODER",
    "DIT",
    "ReferenceLayout",
    "convert_checkpoint",
    "detect_layout",
    "select_state_dict",
]


@dataclass(frozen=True)
class ReferenceLayout:
    """One reference checkpoint layout: its raw / EMA entry names and the model it loads into."""

    name: str
    raw_key: str
    ema_key: str
    model_class: str  # "module:Class"
    default_use_ema: bool

    @property
    def keys(self) -> tuple[str, str]:
        return (self.raw_key, self.ema_key)


AUTOENCODER = ReferenceLayout("autoencoder", "vae_wo_ddp", "vae_ema", "dmvae.autoencoder:DMVAE", False)
DIT = ReferenceLayout("LatentDiT", "model", "ema", "dmvae.dit:LatentDiT", True)
LAYOUTS = (AUTOENCODER, DIT)


def detect_layout(ckpt: Any, source: str = "checkpoint") -> ReferenceLayout:
    """The layout of a loaded reference checkpoint, from its top-level keys."""
    keys = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else []
    for layout in LAYOUTS:
        if any(k in keys for k in layout.keys):
            return layout
    expected = " or ".join(f"{lay.raw_key!r}/{lay.ema_key!r} ({lay.name})" for lay in LAYOUTS)
    got = f"top-level keys {keys[:10]}" if isinstance(ckpt, Mapping) else f"a {type(ckpt).__name__}"
    raise CheckpointError(f"{source}: not a reference checkpoint (expected {expected}; found {got})")


def _is_bare_state_dict(ckpt: Mapping[str, Any]) -> bool:
    return bool(ckpt) and all(isinstance(v, Tensor) for v in ckpt.values())


def select_state_dict(
    layout: ReferenceLayout, ckpt: Any, use_ema: bool | None, source: str
) -> dict[str, Tensor]:
    """The raw (``use_ema=False``) or EMA state dict of a reference checkpoint of ``layout``
    (``use_ema=None``: the layout's default). Keys starting with ``_`` (torch metadata) are
    dropped. A bare state dict is taken as is unless EMA weights are asked for explicitly
    (``use_ema=True``), which is an error rather than a silent fallback."""
    explicit_ema = use_ema is True
    use_ema = layout.default_use_ema if use_ema is None else use_ema
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"{source}: expected a dict with {layout.raw_key!r} / {layout.ema_key!r} state dicts, got "
            f"{type(ckpt).__name__}"
        )
    key = layout.ema_key if use_ema else layout.raw_key
    keys = sorted(str(k) for k in ckpt)
    if key in ckpt:
        sd = ckpt[key]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{source}: {key!r} should be a state dict, got {type(sd).__name__}")
        return {str(k): v for k, v in sd.items() if not str(k).startswith("_")}
    if _is_bare_state_dict(ckpt):
        if not explicit_ema:
            return {str(k): v for k, v in ckpt.items() if not str(k).startswith("_")}
        raise CheckpointError(
            f"{source} holds a bare state dict (no {layout.raw_key!r} / {layout.ema_key!r} entries), so "
            "it has no EMA weights; load it with use_ema=False"
        )
    other = layout.raw_key if use_ema else layout.ema_key
    hint = f" It has {other!r}: pass use_ema={not use_ema} to load those weights." if other in ckpt else ""
    foreign = next((lay for lay in LAYOUTS if lay is not layout and any(k in ckpt for k in lay.keys)), None)
    if foreign is not None:
        cls = foreign.model_class.rpartition(":")[2]
        hint = f" This is a {foreign.name} checkpoint ({foreign.raw_key!r}/{foreign.ema_key!r}): load it with {cls}.from_pretrained."
    raise CheckpointError(f"{source} has no {key!r} entry (use_ema={use_ema}); top-level keys found: {keys[:20]}.{hint}")


def convert_checkpoint(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: Any,
    *,
    use_ema: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[Any, Path, bool]:
    """Convert a reference ``.pt`` into ``output/`` (``config.json`` + ``model.safetensors``).

    Args:
        source: the reference checkpoint (``vae.pt`` or ``ep*.pt``); its layout picks the model.
        output: the directory to write. If it already holds a model (``config.json`` or
            ``model.safetensors``) it is refused unless ``overwrite=True`` (checked before any
            work is done).
        config: a preset name, a config or a dict for the detected model.
        use_ema: EMA (True) or raw (False) weights; ``None`` = the layout's default (raw for the
            autoencoder, EMA for a LatentDiT: what ``from_pretrained`` loads).
        overrides: config fields to change (``{"input_size": 16}``).

    Returns ``(model, output directory, whether EMA weights were taken)``.
    """
    import importlib

    from dmvae._config import resolve_config
    from dmvae.files import read_torch_checkpoint
    from dmvae.hub import CONFIG_NAME, WEIGHTS_NAME

    out = Path(output)
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a model ({', '.join(existing)}); pass overwrite=True "
                              "(dmvae convert --overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory")
    ckpt = read_torch_checkpoint(source)
    layout = detect_layout(ckpt, str(source))
    use_ema = layout.default_use_ema if use_ema is None else bool(use_ema)
    module_name, _, class_name = layout.model_class.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    cfg = resolve_config(cls.config_class, config)
    if overrides:
        cfg = cfg.replace(**dict(overrides))
    state_dict = select_state_dict(layout, ckpt, use_ema, str(source))
    del ckpt
    model = cls._build_and_load(cfg, state_dict, source=str(source))
    return model, model.save_pretrained(out), use_ema
