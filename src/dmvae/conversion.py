"""Reference checkpoints -> dmvae directories: the one pipeline behind ``dmvae convert``.

:mod:`dmvae.convert` says what a loaded reference checkpoint is and which state dict to take
(pure functions); this module reads the file, finds the model class through the registry
(:data:`dmvae._registry.MODEL_CLASSES`, filled by the model modules), builds the model with the
chosen weights (strictly: every key, shape and dtype kind must match) and saves it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmvae import models
from dmvae._config import resolve_config
from dmvae.convert import detect_layout, select_state_dict
from dmvae.files import read_torch_checkpoint
from dmvae.hub import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["convert_checkpoint"]


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
    cls = models.model_class(layout.model)
    cfg = resolve_config(cls.config_class, config)
    if overrides:
        cfg = cfg.replace(**dict(overrides))
    state_dict = select_state_dict(layout, ckpt, use_ema, str(source))
    del ckpt
    model = cls.from_state_dict(cfg, state_dict, source=str(source))
    return model, model.save_pretrained(out), use_ema
