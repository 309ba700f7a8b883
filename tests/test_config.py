"""ConfigMixin: JSON round trip and clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dmvae._config import ConfigMixin


@dataclass
class Cfg(ConfigMixin):
    size: int = 8
    mult: tuple[int, ...] = (1, 2)
    kwargs: dict = field(default_factory=dict)
    maybe: tuple[int, int] | None = None


def test_json_round_trip_restores_tuples(tmp_path: Path) -> None:
    cfg = Cfg(size=3, mult=(1, 2, 4), kwargs={"depth": 2}, maybe=(5, 6))
    cfg.save(tmp_path / "c.json")
    back = Cfg.load(tmp_path / "c.json")
    assert back == cfg
    assert isinstance(back.mult, tuple) and isinstance(back.maybe, tuple)


def test_unknown_keys_are_rejected_with_the_known_ones_listed() -> None:
    with pytest.raises(ValueError, match=r"unknown Cfg field\(s\) \['sise'\].*size"):
        Cfg.from_dict({"sise": 3})
    with pytest.raises(ValueError, match="unknown"):
        Cfg().replace(nope=1)
    assert Cfg().replace(size=9).size == 9


def test_private_keys_are_ignored_and_bad_files_raise(tmp_path: Path) -> None:
    assert Cfg.from_dict({"_class_name": "Cfg", "size": 2}).size == 2
    with pytest.raises(FileNotFoundError):
        Cfg.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Cfg.load(tmp_path / "bad.json")
    with pytest.raises(TypeError):
        Cfg.from_dict([1, 2])  # type: ignore[arg-type]
