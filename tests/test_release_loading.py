"""Loading the official release layout (`sen-ye/dmvae`: vae.pt, ep*.pt) from the HF cache, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each check loads in a fresh interpreter (HF_HUB_OFFLINE set before import)

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def _cache_with(tmp_path: Path, files: dict[str, Path]) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--sen-ye--dmvae"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        os.symlink(src, snap / name)
    return cache


def _run(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_vae_from_repo_id_offline(tmp_path: Path, fixtures_dir: Path) -> None:
    cache = _cache_with(tmp_path, {"vae.pt": fixtures_dir / "vae" / "vae.pt"})
    # explicit config: loads the reference file from the cache
    out = _run(
        "from dmvae import DMVAE\n"
        "m = DMVAE.from_pretrained('sen-ye/dmvae', config='dmvae-tiny', use_ema=True)\n"
        "print(m.config.z_channels)\n",
        cache,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8"
    # no config: the release preset dmvae-l is used, so the tiny weights are rejected by shape
    out = _run("from dmvae import DMVAE\nDMVAE.from_pretrained('sen-ye/dmvae')\n", cache)
    assert out.returncode != 0
    # dmvae-l holds ~300 M values, the tiny fixture ~1.1 M: the meta build stops long before the
    # shapes could be compared (a ConfigTooLargeError, which is a CheckpointError)
    assert "ConfigTooLargeError" in out.stderr and "does not match the weights" in out.stderr


def test_dit_from_repo_id_offline_with_filename(tmp_path: Path, fixtures_dir: Path) -> None:
    import json

    cfg = json.loads((fixtures_dir / "dit" / "manifest.json").read_text())["constructor_kwargs"]
    cache = _cache_with(tmp_path, {"ep400.pt": fixtures_dir / "dit" / "ckpt.pt"})
    out = _run(
        "from dmvae import LatentDiT\n"
        f"m = LatentDiT.from_pretrained('sen-ye/dmvae', filename='ep400.pt', config={cfg!r})\n"
        "print(m.config.hidden_size)\n",
        cache,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cfg["hidden_size"])
    # a file that is not in the cache: a clear error naming it
    out = _run(
        "from dmvae import LatentDiT\n"
        f"LatentDiT.from_pretrained('sen-ye/dmvae', filename='ep64.pt', config={cfg!r})\n",
        cache,
    )
    assert out.returncode != 0 and "ep64.pt" in out.stderr
