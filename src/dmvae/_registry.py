"""One registry mechanism for everything that is looked up by name (model presets, model classes,
priors).

    MODELS.register("dmvae-tiny", factory)    # or @MODELS.register("dmvae-tiny")
    MODELS.get("DMVAE-Tiny")                  # case-insensitive; unknown names say "did you mean"
    MODELS.names("dmvae-*")                   # sorted, with an optional fnmatch pattern

The registries hold objects (config factories, classes), never ``"module:Class"`` strings, and are
filled by the modules that define the entries, when they are imported:

* :data:`MODELS`: every model preset, name -> zero-argument function returning a config
  (``DMVAEConfig`` presets in :mod:`dmvae.autoencoder_config`, ``LatentDiTConfig`` presets in
  :mod:`dmvae.dit_config`, both written as a table and registered with
  :meth:`dmvae._config.ConfigMixin.register_presets`);
* :data:`MODEL_CLASSES`: model class name -> class (``"DMVAE"``, ``"LatentDiT"``), registered by
  :mod:`dmvae.autoencoder` and :mod:`dmvae.dit`;
* :data:`CONFIG_CLASSES`: config class name -> class (the ``_class_name`` tag of a ``config.json``),
  registered by every :class:`~dmvae._config.ConfigMixin` subclass;
* ``dmvae.priors.base.PRIORS``: the reference priors.

:func:`dmvae.models.create_model` / :func:`dmvae.models.list_models` (``dmvae.create_model``) import
every model family and are the entry points for users.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["CONFIG_CLASSES", "MODELS", "MODEL_CLASSES", "Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the known names (and the closest one)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> object, for one kind of thing (``kind`` is used in error messages).

    Names keep the spelling they were registered with and are looked up case-insensitively.
    Registering a name twice (in any case) is an error unless ``override=True``, so two plugins
    cannot silently shadow each other."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}  # registered spelling -> object
        self._index: dict[str, str] = {}  # casefolded name -> registered spelling

    def _fold(self, name: Any) -> str:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {type(name).__name__} {name!r}")
        return name.casefold()

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """``register(name, obj)``, or ``@register(name)`` as a decorator; returns ``obj``."""
        folded = self._fold(name)

        def add(value: T) -> T:
            old = self._index.get(folded)
            if old is not None and not override and self.entries[old] is not value:
                raise ValueError(f"{self.kind} {old!r} is already registered (pass override=True to replace it)")
            if old is not None:
                del self.entries[old]
            self.entries[name] = value
            self._index[folded] = name
            return value

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        key = self.canonical(name)
        del self._index[key.casefold()]
        return self.entries.pop(key)

    def get(self, name: str) -> T:
        """The entry called ``name`` (any case); an unknown name raises :class:`UnknownNameError`
        naming the closest known name and listing all of them."""
        return self.entries[self.canonical(name)]

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name``; unknown names raise :class:`UnknownNameError`."""
        key = self._index.get(self._fold(name))
        if key is None:
            raise UnknownNameError(f"unknown {self.kind} {name!r}{self.suggest(name)}; known: {self.names()}")
        return key

    def suggest(self, name: str, names: list[str] | None = None) -> str:
        """``" (did you mean 'x'?)"`` for the known name closest to ``name``, else ``""``."""
        names = self.names() if names is None else names
        folded = {n.casefold(): n for n in names}
        close = difflib.get_close_matches(str(name).casefold(), list(folded), n=1, cutoff=0.6)
        return f" (did you mean {folded[close[0]]!r}?)" if close else ""

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names, sorted; ``pattern`` filters with shell wildcards, ignoring case
        (``"*xl*"``)."""
        names = sorted(self.entries)
        if pattern is None:
            return names
        return [n for n in names if fnmatch.fnmatchcase(n.casefold(), pattern.casefold())]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.casefold() in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"


#: Model presets of every family: name -> zero-argument function returning a config.
MODELS: Registry[Callable[[], Any]] = Registry("model preset")

#: Model classes by class name (``"DMVAE"``, ``"LatentDiT"``); a config's ``model`` names its class.
MODEL_CLASSES: Registry[type] = Registry("model class")

#: Config classes by class name (``"DMVAEConfig"``): what a ``config.json``'s ``_class_name`` names.
CONFIG_CLASSES: Registry[type] = Registry("config class")
