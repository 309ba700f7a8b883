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

This module only looks at checkpoints already in memory: it reads no file, imports no model and
writes nothing. Turning a reference file into one of our directories (``config.json`` +
``model.safetensors``) is :func:`dmvae.conversion.convert_checkpoint`, above the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dmvae.files import CheckpointError

__all__ = [
    "AUTOENCODER",
    "DIT",
    "LAYOUTS",
    "ReferenceLayout",
    "detect_layout",
    "select_state_dict",
]


@dataclass(frozen=True)
class ReferenceLayout:
    """One reference checkpoint layout: its raw / EMA entry names and the name of the model class
    it loads into (the key of :data:`dmvae._registry.MODEL_CLASSES`)."""

    name: str
    raw_key: str
    ema_key: str
    model: str
    default_use_ema: bool

    @property
    def keys(self) -> tuple[str, str]:
        return (self.raw_key, self.ema_key)


AUTOENCODER = ReferenceLayout("autoencoder", "vae_wo_ddp", "vae_ema", "DMVAE", False)
DIT = ReferenceLayout("LatentDiT", "model", "ema", "LatentDiT", True)
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
        hint = (f" This is a {foreign.name} checkpoint ({foreign.raw_key!r}/{foreign.ema_key!r}): load it with "
                f"{foreign.model}.from_pretrained.")
    raise CheckpointError(f"{source} has no {key!r} entry (use_ema={use_ema}); top-level keys found: {keys[:20]}.{hint}")

