"""Strict, atomic, offline-capable weight I/O (dmvae.hub) on a small stand-in model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from dmvae import files
from dmvae._config import ConfigMixin
from dmvae.files import CheckpointError
from dmvae.hub import HubMixin


@dataclass
class TinyConfig(ConfigMixin):
    width: int = 4
    depth: int = 2

    @classmethod
    def from_preset(cls, name: str) -> "TinyConfig":
        if name != "tiny":
            raise ValueError(f"unknown preset {name!r}; known presets: ['tiny']")
        return cls()


class TinyNet(nn.Module, HubMixin):
    config_class = TinyConfig
    _reference_filenames = ("ref.pt",)
    _default_use_ema = False

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.Sequential(*[nn.Linear(config.width, config.width) for _ in range(config.depth)])
        self.register_buffer("scale", torch.full((config.width,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) * self.scale

    @classmethod
    def _select_reference_state_dict(cls, ckpt, use_ema, source):
        key = "ema" if use_ema else "model"
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise CheckpointError(f"{source}: no {key!r} entry; found {sorted(ckpt)}")
        return ckpt[key]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_load_round_trip_is_bitwise(tmp_path: Path) -> None:
    model = TinyNet(TinyConfig(width=5, depth=3))
    out = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["width"] == 5
    loaded = TinyNet.from_pretrained(out)
    assert loaded.config == model.config
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_dtype_and_device_arguments(tmp_path: Path) -> None:
    TinyNet(TinyConfig()).save_pretrained(tmp_path)
    loaded = TinyNet.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_reference_pt_picks_ema_or_raw_and_needs_config(tmp_path: Path) -> None:
    raw, ema = TinyNet(TinyConfig()), TinyNet(TinyConfig())
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict()}, tmp_path / "ref.pt")
    with pytest.raises(ValueError, match="config"):
        TinyNet.from_pretrained(tmp_path / "ref.pt")
    got_raw = TinyNet.from_pretrained(tmp_path / "ref.pt", config="tiny")
    got_ema = TinyNet.from_pretrained(tmp_path / "ref.pt", config="tiny", use_ema=True)
    assert torch.equal(got_raw.layers[0].weight, raw.layers[0].weight)
    assert torch.equal(got_ema.layers[0].weight, ema.layers[0].weight)
    # a directory holding the reference file is found too
    got_dir = TinyNet.from_pretrained(tmp_path, config=TinyConfig())
    assert torch.equal(got_dir.layers[0].weight, raw.layers[0].weight)


def test_strict_loading_reports_everything_and_leaves_model_untouched(tmp_path: Path) -> None:
    model = TinyNet(TinyConfig(width=4, depth=2))
    before = _snapshot(model)
    bad = TinyNet(TinyConfig(width=4, depth=2)).state_dict()
    bad["layers.0.weight"] = torch.zeros(3, 4)  # wrong shape
    del bad["layers.1.bias"]  # missing
    bad["extra.weight"] = torch.zeros(1)  # unexpected
    bad["layers.0.bias"] = torch.full((4,), 7.0)  # valid entry: must NOT be applied
    with pytest.raises(CheckpointError) as err:
        model.load_weights(bad)
    msg = str(err.value)
    assert "layers.1.bias" in msg and "extra.weight" in msg
    assert "expected shape (4, 4), got (3, 4)" in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"


def test_wrong_config_for_checkpoint_raises(tmp_path: Path) -> None:
    TinyNet(TinyConfig(width=4)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shape"):
        TinyNet.from_pretrained(tmp_path, config=TinyConfig(width=6))


def test_corrupt_and_truncated_safetensors(tmp_path: Path) -> None:
    TinyNet(TinyConfig()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        TinyNet.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        TinyNet.from_pretrained(tmp_path)


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": Evil()}, tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        TinyNet.from_pretrained(tmp_path / "ref.pt", config="tiny")
    assert not (tmp_path / "pwned").exists()


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        TinyNet.from_pretrained(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        TinyNet.from_pretrained(tmp_path / "empty")


def test_atomic_write_keeps_previous_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "f.bin"
    files.atomic_write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        files.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


def _fake_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out ``files`` the way huggingface_hub stores a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


_OFFLINE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_hub import TinyNet
m = TinyNet.from_pretrained({repo!r}, cache_dir={cache!r}, **{kwargs})
print(float(m.layers[0].weight.sum()))
"""


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.parametrize("layout", ["ours", "reference"])
def test_offline_load_from_populated_hf_cache(tmp_path: Path, layout: str) -> None:
    model = TinyNet(TinyConfig())
    src = tmp_path / "src"
    if layout == "ours":
        model.save_pretrained(src)
        files = {"config.json": src / "config.json", "model.safetensors": src / "model.safetensors"}
        kwargs = {}
    else:
        src.mkdir()
        torch.save({"model": model.state_dict(), "ema": model.state_dict()}, src / "ref.pt")
        files = {"ref.pt": src / "ref.pt"}
        kwargs = {"config": "tiny"}
    cache = tmp_path / "cache"
    _fake_hf_cache(cache, "someone/tiny", files)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = _OFFLINE_SCRIPT.format(
        tests=str(Path(__file__).parent), repo="someone/tiny", cache=str(cache), kwargs=kwargs
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert abs(float(out.stdout.strip()) - float(model.layers[0].weight.detach().sum())) < 1e-6

    # a repo that is not in the cache fails with a message that says so
    script = _OFFLINE_SCRIPT.format(
        tests=str(Path(__file__).parent), repo="someone/absent", cache=str(cache), kwargs=kwargs
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "someone/absent" in out.stderr and ("cache" in out.stderr or "Hub" in out.stderr)


def test_push_to_hub_uploads_a_loadable_folder(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    calls: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, revision, commit_message, create_pr):
            # copy what would be uploaded, then check it loads like a hub snapshot
            import shutil

            shutil.copytree(folder_path, tmp_path / "uploaded")
            calls["upload"] = (repo_id, commit_message)
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = TinyNet(TinyConfig(width=3))
    url = model.push_to_hub("me/tiny", private=True, token="t0k")
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("me/tiny", True, True) and calls["token"] == "t0k"
    loaded = TinyNet.from_pretrained(tmp_path / "uploaded")
    assert torch.equal(loaded.layers[0].weight, model.layers[0].weight)
