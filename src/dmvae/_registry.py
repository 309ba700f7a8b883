"""One registry mechanism for everything that is looked up by name (model presets, priors).

    MODELS = Registry("model")

    @MODELS.register("dmvae-tiny")
    def _tiny() -> DMVAEConfig: ...

    MODELS.get("dmvae-tiny")      # the function; unknown names list the known ones
    MODELS.names("dmvae-*")       # sorted, with an optional fnmatch pattern

:data:`MODELS` holds the presets of every model family: each entry is a zero-argument function
returning a config (``DMVAEConfig``, ``LatentDiTConfig``), and the config class names the model
class that builds it. :func:`create_model` / :func:`list_models` are the timm-style entry points.
The registries are filled when the modules defining the entries are imported (no import-time
side effects elsewhere); :func:`list_models` imports the model modules first.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from torch import nn

__all__ = ["MODELS", "Registry", "UnknownNameError", "create_model", "list_models", "model_config"]

T = TypeVar("T")

# Modules that register model presets; imported before any model lookup.
_MODEL_MODULES = ("dmvae.autoencoder", "dmvae.dit")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered (a ``KeyError`` and, for older callers, a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> object, for one kind of thing (``kind`` is used in error messages).

    Registering a name twice is an error unless ``override=True`` (so two plugins cannot silently
    shadow each other). ``case_sensitive=False`` stores and looks up names lower-cased."""

    def __init__(self, kind: str, *, case_sensitive: bool = True) -> None:
        self.kind = kind
        self.case_sensitive = case_sensitive
        self.entries: dict[str, T] = {}

    def key(self, name: Any) -> str:
        """The stored form of ``name``; a non-string or empty name raises ``TypeError``."""
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {type(name).__name__} {name!r}")
        return name if self.case_sensitive else name.lower()

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """``register(name, obj)``, or ``@register(name)`` as a decorator; returns ``obj``."""
        key = self.key(name)

        def add(value: T) -> T:
            if key in self.entries and not override and self.entries[key] is not value:
                raise ValueError(f"{self.kind} {key!r} is already registered (pass override=True to replace it)")
            self.entries[key] = value
            return value

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        return self.entries.pop(self._check(name))

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises :class:`UnknownNameError` listing the
        known ones."""
        return self.entries[self._check(name)]

    def _check(self, name: Any) -> str:
        key = self.key(name)
        if key not in self.entries:
            close = [n for n in self.names() if n.lower() == key.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; known: {self.names()}")
        return key

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names, sorted; ``pattern`` filters with shell wildcards (``"*XL*"``)."""
        names = sorted(self.entries)
        return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name if self.case_sensitive else name.lower()) in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"


#: Model presets of every family: name -> zero-argument function returning a config.
MODELS: Registry[Callable[[], Any]] = Registry("model preset")


def _load_model_modules() -> None:
    for module in _MODEL_MODULES:
        importlib.import_module(module)


def list_models(pattern: str | None = None) -> list[str]:
    """Every model preset name (autoencoders and LatentDiTs), sorted; ``pattern`` as in timm
    (``list_models("LightningDiT-*")``)."""
    _load_model_modules()
    return MODELS.names(pattern)


def model_config(name: str, **overrides: Any) -> Any:
    """The config of preset ``name`` with fields overridden (``KeyError`` lists known names)."""
    _load_model_modules()
    config = MODELS.get(name)()
    return config.replace(**overrides) if overrides else config


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a randomly initialised model from a preset, timm-style::

        create_model("dmvae-tiny")                       # a DMVAE
        create_model("LightningDiT-XL/1", num_classes=10)  # a LatentDiT

    ``overrides`` replace config fields. Weights come from ``Model.from_pretrained``.
    """
    config = model_config(name, **overrides)
    module_name, _, class_name = type(config).model_class.partition(":")
    return getattr(importlib.import_module(module_name), class_name)(config)
