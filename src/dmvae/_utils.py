"""Small helpers shared across the package (no heavy imports, no side effects)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["eval_mode", "unwrap_model"]


def unwrap_model(model: Any) -> Any:
    """The plain module under any stack of training wrappers.

    Strips, repeatedly and in any order, ``DistributedDataParallel`` / ``DataParallel``
    (``.module``) and ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), so that
    ``compile(DDP(model))`` and ``DDP(compile(model))`` both give back ``model``. Anything that is
    not an ``nn.Module`` (an optimizer, a scheduler, a plain callable) is returned unchanged.
    """
    while isinstance(model, nn.Module):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


@contextlib.contextmanager
def eval_mode(*modules: object) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block, then give every submodule back its own
    ``training`` flag (a model with a frozen, eval-mode part stays that way). Arguments that are
    not ``nn.Module`` (plain callables, priors given as functions) are ignored."""
    mods = [m for m in modules if isinstance(m, nn.Module)]
    saved = [(sub, sub.training) for m in mods for sub in m.modules()]
    try:
        for m in mods:
            m.eval()
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag
