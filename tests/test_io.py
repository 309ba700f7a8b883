"""dmvae.files and dmvae.sources: atomic writes (file modes), safe readers naming the file, the source resolver."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmvae import files as _io
from dmvae import sources
from dmvae.files import CheckpointError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_normal_mode_under_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        a = _io.atomic_write_bytes(tmp_path / "a.bin", b"x")
        b = _io.atomic_write_text(tmp_path / "b.json", "{}")
        c = _io.atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "c.safetensors")
        with _io.atomic_write(tmp_path / "d.txt", "w") as f:
            f.write("hello")
        with open(tmp_path / "plain", "w") as f:  # what a normal write gives
            f.write("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert _mode(tmp_path / "plain") == expected
    for p in (a, b, c, tmp_path / "d.txt"):
        assert _mode(Path(p)) == expected, p
    assert (tmp_path / "d.txt").read_text() == "hello"


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    _io.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with _io.atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_save_refuses_meta_tensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta device"):
        _io.atomic_save_safetensors({"w": torch.empty(2, device="meta")}, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_read_json_names_file_position_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{\n  "width": 4,\n  "depth": 2,,\n  "x": 1\n}')
    with pytest.raises(ValueError, match=r"config.json.*not valid JSON.*line 3.*'depth'"):
        _io.read_json(bad, what="config")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        _io.read_json(tmp_path / "missing.json")
    good = tmp_path / "ok.json"
    good.write_text(json.dumps({"a": [1, 2]}))
    assert _io.read_json(good) == {"a": [1, 2]}


def test_read_state_dict_file_rejects_non_state_dicts(tmp_path: Path) -> None:
    torch.save({"a": 1, "b": "x"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x.pt should hold a flat dict of tensors"):
        _io.read_state_dict_file(tmp_path / "x.pt")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "y.pt")
    assert list(_io.read_state_dict_file(tmp_path / "y.pt")) == ["w"]
    (tmp_path / "z.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="z.safetensors"):
        _io.read_state_dict_file(tmp_path / "z.safetensors")


def test_parse_hf_uri_and_resolve_file(tmp_path: Path) -> None:
    assert sources.parse_hf_uri("hf://a/b/c/d.pth") == ("a/b", "c/d.pth")
    assert sources.parse_hf_uri("hf://a/b") == ("a/b", None)
    assert sources.parse_hf_uri("a/b") is None
    with pytest.raises(ValueError, match="hf://owner/name"):
        sources.parse_hf_uri("hf://only")
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert sources.resolve_file(f) == f
    with pytest.raises(FileNotFoundError, match=r"LPIPS weights not found: .*nope.pth"):
        sources.resolve_file(tmp_path / "nope.pth", what="LPIPS weights")
    # offline (the test session sets HF_HUB_OFFLINE=1): cache only, and the error says so
    with pytest.raises(FileNotFoundError, match=r"not in the local cache.*the Hub is unreachable"):
        sources.resolve_file("hf://nobody/nothing/file.pth", what="weights")


_FAST_FAIL = """
import sys, time
from dmvae.hub import HubMixin
from dmvae.autoencoder import DMVAE
t = time.perf_counter()
try:
    DMVAE.from_pretrained(sys.argv[1])
except FileNotFoundError as e:
    print("ERR", e)
print("SECONDS", time.perf_counter() - t)
"""


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable-endpoint"])
def test_missing_local_path_fails_fast_naming_both_places(tmp_path: Path, env: dict) -> None:
    """A path that does not exist is tried as a Hub repo, but an unreachable Hub is not retried:
    the error comes within seconds and names the local directory and the repo."""
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    full.update(env, HF_HOME=str(tmp_path / "hf"))
    # the timeout bounds the run (network retries took ~25-50 s); it is not a speed measurement
    res = subprocess.run([sys.executable, "-c", _FAST_FAIL, "out/dmvae-l"], cwd=tmp_path, env=full,
                         capture_output=True, text=True, timeout=60)
    assert "ERR" in res.stdout, res.stdout + res.stderr
    assert "no local directory or file 'out/dmvae-l'" in res.stdout
    assert "the Hugging Face Hub repo 'out/dmvae-l' is not in the local cache" in res.stdout
    assert "the Hub is unreachable" in res.stdout
    assert "Retrying" not in res.stderr  # huggingface_hub's network retry loop never ran
