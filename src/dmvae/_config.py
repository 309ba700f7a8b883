"""JSON round-trip, type checking and presets for the library's dataclass configs.

Every config (``DMVAEConfig``, ``LatentDiTConfig``, ...) is a plain dataclass that inherits
:class:`ConfigMixin`, so ``config.json`` is exactly ``dataclasses.asdict(config)`` plus a
``"_class_name"`` tag (the config class). Unknown keys and values of the wrong type are errors
naming the field (and the file), never silently dropped or coerced.

Every model config lives in a module of its own beside its model (``autoencoder_config``,
``dit_config``), sets ``model`` to the name of the model class it builds (a key of
:data:`dmvae._registry.MODEL_CLASSES`) and writes its presets as one table of field values,
registered with :meth:`ConfigMixin.register_presets` in :data:`dmvae._registry.MODELS`;
:meth:`ConfigMixin.from_preset` reads them back and :func:`resolve_config` is the one place that
turns "a config, a dict or a preset name" into a config instance.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from typing_extensions import Self

from dmvae._registry import CONFIG_CLASSES

__all__ = ["ConfigMixin", "resolve_config"]

T = TypeVar("T")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to the declared type (JSON lists -> tuples, ints -> floats), or a
    ``TypeError`` naming ``where``. Only the types configs use are checked; others pass."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, arg, where)
            except TypeError:
                pass
        raise TypeError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise TypeError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise TypeError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    kind = dict if origin in (dict, Mapping) else list if origin is list else annotation
    if kind in _JSON_KINDS:
        accepted, expected = _JSON_KINDS[kind]
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind in (int, float)):
            raise TypeError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
        return float(value) if kind is float else value
    return value


# A plain field type -> (the JSON values it accepts, how an error names it); bool is not an int here.
_JSON_KINDS: dict[Any, tuple[type | tuple[type, ...], str]] = {
    dict: (dict, "a dict"), list: (list, "a list"), bool: (bool, "true or false"), int: (int, "an int"),
    float: ((int, float), "a number"), str: (str, "a string"),
}


class ConfigMixin:
    """Adds ``to_dict`` / ``from_dict`` / ``to_json`` / ``save`` / ``load`` / ``from_preset`` /
    ``replace`` to a dataclass."""

    #: Name of the model class a config builds (model configs only; a key of
    #: :data:`dmvae._registry.MODEL_CLASSES`).
    model: ClassVar[str] = ""
    #: Fields that :meth:`load` requires in a file (no silent defaults for them).
    required_in_file: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CONFIG_CLASSES.register(cls.__name__, cls, override=True)  # a redefinition replaces it

    @classmethod
    def model_name(cls) -> str:
        """The class name of the model this config builds (``"DMVAE"``), else the config's own."""
        return cls.model or cls.__name__

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a dict of fields (``_``-prefixed keys such as ``_class_name`` are ignored).
        Unknown fields and values of the wrong type raise, naming the field."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if not str(k).startswith("_")}
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _check_value(v, hints.get(k, Any), f"{cls.__name__}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        """The ``config.json`` text: ``{"_class_name": <config class>, **fields}``."""
        return json.dumps({"_class_name": type(self).__name__, **self.to_dict()}, indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically."""
        from dmvae.files import atomic_write_text

        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def check_class_name(cls, data: Mapping[str, Any], source: str) -> None:
        """Refuse a config written for another class (``config.json`` of a LatentDiT read as a
        DMVAE config), saying what it is. Untagged dicts pass."""
        tag = data.get("_class_name")
        if tag is None or tag == cls.__name__:
            return
        other = CONFIG_CLASSES.get(str(tag)) if str(tag) in CONFIG_CLASSES else None
        what = f"a {other.model_name()}" if other is not None else f"a {tag!r}"
        hint = f": load it with dmvae.{other.model_name()}.from_pretrained" if other and other.model else ""
        raise ValueError(f"{source} describes {what}, not a {cls.model_name()}{hint}")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read a ``config.json``; every error names the file (and the field)."""
        from dmvae.files import read_json

        data = read_json(path, what=f"{cls.model_name()} config")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of {cls.__name__} fields, got {type(data).__name__}")
        cls.check_class_name(data, str(path))
        missing = [f for f in cls.required_in_file if f not in data]
        if missing:
            raise ValueError(
                f"{path} does not state {', '.join(missing)}; loading it would silently use the "
                f"defaults ({', '.join(f'{f}={getattr(cls, f, None)!r}' for f in missing)}). Add the "
                "values the model was trained with to the file, or pass the config explicitly "
                "(from_pretrained(..., config={**fields, " + ", ".join(f"{f!r}: ..." for f in missing) + "}))"
            )
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def register_presets(cls, table: Mapping[str, Mapping[str, Any]]) -> None:
        """Register each ``name -> {field: value}`` of ``table`` as a preset of this config in
        :data:`dmvae._registry.MODELS` (each call of the preset builds a fresh config)."""
        from dmvae._registry import MODELS

        for name, fields in table.items():
            MODELS.register(name, functools.partial(_preset, cls, dict(fields)))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Self:
        """The named configuration (``dmvae._registry.MODELS``, any case), with some fields
        changed. An unknown name says which known one is closest; another family's preset says
        which family it belongs to."""
        from dmvae._registry import MODELS, UnknownNameError

        names = cls.preset_names()
        if name not in MODELS:
            raise UnknownNameError(
                f"unknown {cls.model_name()} preset {name!r}{MODELS.suggest(name, names)}; "
                f"known {cls.model_name()} presets: {names}"
            )
        config = MODELS.get(name)()
        if not isinstance(config, cls):
            raise UnknownNameError(
                f"{MODELS.canonical(name)!r} is a {type(config).model_name()} preset, not a "
                f"{cls.model_name()} one; known {cls.model_name()} presets: {names}"
            )
        return config.replace(**overrides) if overrides else config

    @classmethod
    def preset_names(cls) -> list[str]:
        """Names :meth:`from_preset` accepts for this config class, sorted."""
        from dmvae._registry import MODELS

        return [n for n in MODELS.names() if issubclass(_preset_class(MODELS.get(n)), cls)]

    def replace(self, **overrides: Any) -> Self:
        """A copy with some fields changed (``dataclasses.replace`` with a clear error)."""
        fields = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} field(s) {unknown}; known fields: {sorted(fields)}")
        return dataclasses.replace(self, **overrides)  # type: ignore[type-var]


def _preset(config_class: type[T], fields: dict[str, Any]) -> T:
    return config_class(**copy.deepcopy(fields))


def _preset_class(factory: Any) -> type:
    """The config class a registered preset builds (without building it when it is a table row)."""
    if isinstance(factory, functools.partial) and factory.func is _preset:
        return factory.args[0]
    return type(factory())


def resolve_config(config_class: type[T], config: Any) -> T:
    """A ``config_class`` instance from an instance, a dict of fields or a preset name."""
    if isinstance(config, config_class):
        return config
    if isinstance(config, Mapping):
        return config_class.from_dict(dict(config))  # type: ignore[attr-defined]
    if isinstance(config, str):
        return config_class.from_preset(config)  # type: ignore[attr-defined]
    names = config_class.preset_names() if hasattr(config_class, "preset_names") else []
    raise TypeError(
        f"config must be a {config_class.__name__}, a dict or a preset name ({names}), "
        f"got {type(config).__name__}"
    )
