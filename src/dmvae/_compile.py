"""Regional ``torch.compile`` for dmvae models (the home of :meth:`DMVAE.compile` and
:meth:`LatentDiT.compile`).

Regional compilation (diffusers' ``compile_repeated_blocks``): instead of tracing a whole network,
every instance of the *repeated* block class is compiled in place with ``nn.Module.compile``.
Dynamo treats the parameters of an inlined module as graph inputs, so the ``depth`` blocks of a
transformer share ONE compiled graph: compile time is that of a single block, not of the
network, and a second model of the same architecture reuses the cache. The block paths of dmvae
(:class:`~dmvae.dit.LatentDiTBlock`, timm's ViT ``Block``, the decoder) branch on nothing but
shapes and module attributes, so they trace with ``fullgraph=True`` (a graph break raises).

Recompilation is driven by guards on shapes and Python values only: the time ``t`` reaches a
block as the conditioning *tensor* ``c``, so changing timesteps never recompiles (tested).
A new batch size recompiles once; with ``dynamic=None`` (the default) torch then marks the batch
dimension dynamic and no further sizes recompile. ``dynamic=False`` keeps every shape static
(what CUDA graphs, ``mode="reduce-overhead"``, want: sample with a fixed batch).

Inductor *freezing* (``freezing=True``) folds the weights into the compiled graph as constants
and pre-packs convolution / linear weights for oneDNN; it only acts on calls made without
gradient tracking (inference) and is only valid while the weights do not change: compile again
after loading new weights. Because a frozen graph cannot be shared by blocks with different
weights, freezing is applied to whole-module compiles only (the decoder), never to repeated
blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["compile_module", "compile_repeated_blocks", "is_compiled"]


def _compile_kwargs(
    *, fullgraph: bool, dynamic: bool | None, mode: str | None, backend: str, options: dict[str, Any] | None
) -> dict[str, Any]:
    if mode is not None and options:
        # torch.compile refuses both; say which switch to drop
        raise ValueError(
            f"torch.compile takes either mode= or options=, not both (got mode={mode!r}, "
            f"options={sorted(options)}); drop freezing=/options= or mode="
        )
    kwargs: dict[str, Any] = dict(fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    if mode is not None:
        kwargs["mode"] = mode
    if options:
        kwargs["options"] = dict(options)
    return kwargs


def compile_module(module: nn.Module, *, fullgraph: bool = True, dynamic: bool | None = None, mode: str | None = None,
                   backend: str = "inductor", options: dict[str, Any] | None = None) -> nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``, whatever ``compile`` the class defines);
    state-dict keys are unchanged."""
    nn.Module.compile(module, **_compile_kwargs(fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend,
                                     options=options))
    return module


def compile_repeated_blocks(model: nn.Module, block_types: type[nn.Module] | tuple[type[nn.Module], ...], *,
                            fullgraph: bool = True, dynamic: bool | None = None, mode: str | None = None,
                            backend: str = "inductor", options: dict[str, Any] | None = None) -> list[nn.Module]:
    """Compile, in place, every submodule of ``model`` that is an instance of ``block_types``.

    Returns the compiled blocks. Raises ``ValueError`` if there is none (a silent no-op would look
    like a compiled model). ``options`` must not contain ``freezing`` (see the module docstring).
    """
    if options and options.get("freezing"):
        raise ValueError(
            "freezing folds each block's weights into its graph, so repeated blocks could not share "
            "one graph; freeze whole modules (compile_module) instead"
        )
    kwargs = _compile_kwargs(fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend,
                             options=options)
    blocks = [m for m in model.modules() if isinstance(m, block_types)]
    if not blocks:
        names = block_types.__name__ if isinstance(block_types, type) else [t.__name__ for t in block_types]
        raise ValueError(f"{type(model).__name__} has no submodule of type {names} to compile")
    for block in blocks:
        nn.Module.compile(block, **kwargs)
    return blocks


def is_compiled(modules: nn.Module | Iterable[nn.Module]) -> bool:
    """True if ``modules`` (or any module in the iterable, or any submodule) was compiled in place."""
    items = [modules] if isinstance(modules, nn.Module) else list(modules)
    return any(getattr(m, "_compiled_call_impl", None) is not None for item in items for m in item.modules())
