"""JSON round-trip for the library's dataclass configs.

Every model config (``DMVAEConfig``, ``LatentDiTConfig``) is a plain dataclass that inherits
:class:`ConfigMixin`, so ``config.json`` is exactly ``dataclasses.asdict(config)`` plus a
``"_class_name"`` tag, and unknown keys are an error rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import Self

T = TypeVar("T")


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn JSON values back into the declared type (JSON has no tuples)."""
    origin = typing.get_origin(annotation)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return tuple(value)
    return value


class ConfigMixin:
    """Adds ``to_dict`` / ``from_dict`` / ``save`` / ``load`` to a dataclass."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints.get(k, Any)) for k, v in data.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps({"_class_name": type(self).__name__, **self.to_dict()}, indent=2)

    def save(self, path: str | os.PathLike[str]) -> None:
        from dmvae.hub import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> Self:
        """A copy with some fields changed (``dataclasses.replace`` with a clear error)."""
        fields = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown {type(self).__name__} field(s) {unknown}; known fields: {sorted(fields)}"
            )
        return dataclasses.replace(self, **overrides)  # type: ignore[type-var]
