"""Shared test fixtures: the upstream golden files, the seed, and ``max_abs``.

Tests take these as fixtures (``def test_x(fixtures_dir, max_abs)``); a test never imports
``conftest`` by name (pytest loads it as a plugin; a second import would be a second module).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# Tests never touch the network: huggingface_hub reads this once, at import, so set it first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _fixtures_dir() -> Path:
    env = os.environ.get("DMVAE_FIXTURES")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "fixtures" / "upstream"


FIXTURES = _fixtures_dir()

# The test models are tiny: one thread is as fast as two in isolation and much faster on a shared
# machine, where multi-threaded tiny ops mostly wait for each other. The fixtures were made with
# one thread too. Override with DMVAE_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("DMVAE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (``benchmarks/``, ``examples/``, ``docs/`` live there)."""
    return REPO_ROOT


def _load_script(path: Path, module_name: str):
    """Import the script at ``path`` as a module named ``module_name``. Its folder is on ``sys.path``
    while it runs, as when the script is started directly, so it can import its siblings (the
    examples import ``_train_utils``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)  # the first occurrence: the one inserted here
    return module


@pytest.fixture(scope="session")
def load_benchmark(repo_root):
    """``load_benchmark("gpu")`` imports ``benchmarks/gpu.py`` as a module (the scripts are not a package)."""
    return lambda name: _load_script(repo_root / "benchmarks" / f"{name}.py", f"dmvae_bench_{name}")


@pytest.fixture(scope="session")
def load_example(repo_root):
    """``load_example("train_tokenizer")`` imports ``examples/train_tokenizer.py`` as a module (the
    examples are scripts, not a package; tests never put ``examples/`` on ``sys.path`` themselves)."""
    return lambda name: _load_script(repo_root / "examples" / f"{name}.py", f"dmvae_example_{name}")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``shared/fixtures/upstream``; parity tests must not silently skip in CI."""
    if not FIXTURES.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"upstream fixtures not found at {FIXTURES} (set DMVAE_FIXTURES)")
        pytest.skip(f"upstream fixtures not found at {FIXTURES} (set DMVAE_FIXTURES)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic_seed() -> None:
    torch.manual_seed(0)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="session")
def max_abs() -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``max_abs(a, b)``: the largest absolute difference of two tensors, computed in float64."""
    return _max_abs
