"""The top-level namespace: every exported name resolves, and importing dmvae stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import dmvae


@pytest.mark.parametrize("name", [n for n in dmvae.__all__ if n != "__version__"])
def test_every_exported_name_resolves(name: str) -> None:
    obj = getattr(dmvae, name)
    assert getattr(obj, "__name__", name) == name


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        dmvae.Nope  # noqa: B018


@pytest.mark.slow  # a fresh interpreter
def test_import_has_no_heavy_side_effects() -> None:
    code = "import sys, dmvae; print(sorted(m for m in ('torch', 'timm', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
