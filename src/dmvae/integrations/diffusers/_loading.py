"""Strict ``from_pretrained`` for the diffusers models, and lossless copies between module trees.

diffusers' own loader only *warns* about missing or unexpected keys and leaves the missing
weights at their random initialisation; dmvae never loads a checkpoint that does not match
(see ``docs/weights.md``), so :class:`StrictLoadingMixin` turns every such warning into a
:class:`~dmvae.files.CheckpointError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from dmvae.files import CheckpointError

__all__ = ["StrictLoadingMixin", "copy_module"]

M = TypeVar("M", bound=nn.Module)


def _fmt(keys: list[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class StrictLoadingMixin:
    """Put before ``ModelMixin`` in the bases: ``from_pretrained`` raises
    :class:`~dmvae.files.CheckpointError` on missing, unexpected or mismatched keys."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """diffusers' ``ModelMixin.from_pretrained`` (``subfolder=``, ``torch_dtype=``, ``revision=``,
        ``cache_dir=``, ``local_files_only=``, ...), loading strictly."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(  # type: ignore[misc]
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        problems = []
        for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = [k if isinstance(k, str) else str(k[0]) for k in info.get(what) or []]
            if keys:
                problems.append(f"  {what.replace('_', ' ')} ({len(keys)}): {_fmt(keys)}")
        if info.get("error_msgs"):
            problems.append("  errors: " + "; ".join(map(str, info["error_msgs"]))[:2000])
        if problems:
            where = os.fspath(pretrained_model_name_or_path)
            if kwargs.get("subfolder"):
                where += f" (subfolder {kwargs['subfolder']!r})"
            raise CheckpointError(
                f"{where} does not match {cls.__name__} (dmvae loads strictly; diffusers would only "
                "warn and keep random weights):\n" + "\n".join(problems)
                + "\nWas the model saved with the same configuration?"
            )
        # diffusers builds under the requested default dtype, which not every tensor follows (a
        # timm encoder, the RoPE tables): put the whole model in the dtype asked for, as
        # DMVAE.from_pretrained(dtype=...) does.
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and any(
            t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())
        ):
            nn.Module.to(model, dtype=dtype)  # (ModelMixin.to would warn about an empty fp32 list)
        return (model, info) if want_info else model


def copy_module(build: Callable[[], M], source: nn.Module) -> M:
    """A new module from ``build()`` holding a copy of ``source``'s state (same keys and shapes;
    ``strict=True``). Built on the meta device, so nothing is initialised twice; tensors stay on
    ``source``'s device and dtype (a meta ``source`` gives a meta copy, for architecture checks)."""
    with torch.device("meta"):
        target = build()
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    target.load_state_dict(state, strict=True, assign=True)
    # tensors outside the state dict (non-persistent buffers) come from the source as well
    source_buffers = dict(source.named_buffers())
    for name, buf in list(target.named_buffers()):
        if buf.is_meta and not source_buffers[name].is_meta:
            owner, _, leaf = name.rpartition(".")
            target.get_submodule(owner)._buffers[leaf] = source_buffers[name].detach().clone()
    target.train(source.training)
    return target
