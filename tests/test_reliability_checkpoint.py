"""Issue 20: checkpoint pruning, content hashes, confined entry names, all-or-nothing loads with loaders.

Invariants:

* at every instant of a save with ``keep_last`` (a kill at any fault point), every listed step
  loads completely, and the next save leaves no half-deleted or temporary directory;
* a changed byte in any file of a step is an error naming the file, before anything is restored;
* manifest names never reach outside the step directory (no ``..``, no absolute path, no separator,
  no symbolic link);
* ``load_checkpoint`` with a loader target restores nothing when the loader's data differs.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dmvae.training.checkpoint as ckpt_mod
from dmvae.files import CheckpointError
from dmvae.training import list_checkpoints, load_checkpoint, save_checkpoint
from dmvae.training.data import ImageFolder
from dmvae.training.sampler import TrainLoader


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _base(directory: Path) -> dict[int, nn.Module]:
    """Steps 1, 2, 3 saved without pruning; the weights of each step."""
    models = {}
    for step in (1, 2, 3):
        models[step] = _model(step)
        opt = torch.optim.SGD(models[step].parameters(), lr=0.1, momentum=0.9)
        save_checkpoint(directory, step, model=models[step], opt=opt, t=torch.arange(3.0), save_rng=False)
    return models


def _assert_listed_steps_load(directory: Path, models: dict[int, nn.Module]) -> list[int]:
    steps = [s for s, _ in list_checkpoints(directory)]
    for s in steps:
        target = _model(99)
        load_checkpoint(directory, s, model=target, restore_rng=False)  # content hashes verified
        for a, b in zip(target.parameters(), models[s].parameters()):
            assert torch.equal(a, b), s
    return steps


def _fault_points(directory: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(ckpt_mod, "_fault_point", seen.append)
    save_checkpoint(directory, 4, keep_last=2, model=_model(4), save_rng=False)
    monkeypatch.undo()
    return seen


class _Killed(BaseException):
    pass


def test_a_crash_at_every_step_of_a_prune_leaves_only_loadable_steps(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    models = _base(base)
    models[4], models[5] = _model(4), _model(5)
    shutil.copytree(base, tmp_path / "count")
    points = _fault_points(tmp_path / "count", monkeypatch)
    assert points.count("discard-renamed") == 2 and points.count("unlink") >= 6  # two steps pruned file by file
    for k in range(len(points)):
        d = tmp_path / f"trial-{k}"
        shutil.copytree(base, d)
        calls = {"n": 0}

        def crash(stage: str, k: int = k, calls: dict = calls) -> None:
            if calls["n"] == k:
                raise _Killed(stage)
            calls["n"] += 1

        monkeypatch.setattr(ckpt_mod, "_fault_point", crash)
        with pytest.raises(_Killed):
            save_checkpoint(d, 4, keep_last=2, model=models[4], save_rng=False)
        monkeypatch.undo()
        steps = _assert_listed_steps_load(d, models)
        assert set(steps) <= {1, 2, 3, 4} and 3 in steps, (k, points[k], steps)
        save_checkpoint(d, 5, keep_last=2, model=models[5], save_rng=False)
        assert sorted(p.name for p in d.iterdir()) == [f"step_0000000{s}" for s in _assert_listed_steps_load(d, models)]
        assert [s for s, _ in list_checkpoints(d)][-1] == 5 and len(list_checkpoints(d)) == 2


_KILL_SCRIPT = """
import os, signal, sys, torch
from torch import nn
import dmvae.training.checkpoint as ck
k = int(sys.argv[2]); n = [0]
def point(stage):
    if n[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no handler, no cleanup
    n[0] += 1
ck._fault_point = point
torch.manual_seed(4)
ck.save_checkpoint(sys.argv[1], 4, keep_last=2, model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)),
                   save_rng=False)
"""


@pytest.mark.slow
def test_sigkill_at_every_step_of_a_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    models = _base(base)
    models[4], models[5] = _model(4), _model(5)
    shutil.copytree(base, tmp_path / "count")
    points = _fault_points(tmp_path / "count", monkeypatch)
    for k in range(len(points)):
        d = tmp_path / f"trial-{k}"
        shutil.copytree(base, d)
        res = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(d), str(k)], timeout=300, check=False)
        assert res.returncode == -9, (k, points[k])
        steps = _assert_listed_steps_load(d, models)
        assert set(steps) <= {1, 2, 3, 4} and 3 in steps, (k, points[k], steps)
        save_checkpoint(d, 5, keep_last=2, model=models[5], save_rng=False)
        assert not [p.name for p in d.iterdir() if p.name.startswith(".")], k  # no leftovers


def test_half_deleted_directories_are_invisible_and_cleaned(tmp_path: Path) -> None:
    models = _base(tmp_path)
    junk = tmp_path / ".del-step_00000001-0123abcd"
    (tmp_path / "step_00000001").rename(junk)
    (junk / "model.safetensors").unlink()  # killed half way through the deletion
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    _assert_listed_steps_load(tmp_path, models)
    save_checkpoint(tmp_path, 4, model=_model(4), save_rng=False)
    assert not junk.exists()


def test_pruning_a_linked_step_removes_the_link_not_its_target(tmp_path: Path) -> None:
    elsewhere = save_checkpoint(tmp_path / "archive", 1, model=_model(1), save_rng=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "step_00000001").symlink_to(elsewhere, target_is_directory=True)
    for step in (2, 3):
        save_checkpoint(run, step, keep_last=2, model=_model(step), save_rng=False)
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["manifest.json", "model.safetensors"]
    load_checkpoint(tmp_path / "archive", model=_model(9))


# ------------------------------------------------------------------ content hashes


@pytest.mark.parametrize("name", ["model.safetensors", "opt.pt", "tensors.safetensors", "rng.pt"])
def test_any_flipped_byte_is_an_error_naming_the_file_and_nothing_is_restored(tmp_path: Path, name: str) -> None:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, 1, model=model, opt=opt, t=torch.arange(3.0))
    file = path / name
    good = file.read_bytes()
    rng = random.Random(name)
    for offset in sorted({0, len(good) - 1, *(rng.randrange(len(good)) for _ in range(6))}):
        bad = bytearray(good)
        bad[offset] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(bad))
        target = _model(7)
        target_opt = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
        before = [p.clone() for p in target.parameters()]
        with pytest.raises(CheckpointError, match=rf"{name}: content does not match its SHA-256"):
            load_checkpoint(tmp_path, model=target, opt=target_opt)
        assert all(torch.equal(a, b) for a, b in zip(target.parameters(), before)), offset
        assert target_opt.state_dict()["state"] == {}
    file.write_bytes(good)
    load_checkpoint(tmp_path, model=_model(7))


BAD_NAMES = ["../evil", "/etc/passwd", "a/b", "..", "x.safetensors/../../y", "", "m\x00", ".hidden"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_manifest_names_are_confined_to_the_step_directory(tmp_path: Path, bad: str) -> None:
    path = save_checkpoint(tmp_path, 1, m=_model(0), save_rng=False)
    manifest = json.loads((path / "manifest.json").read_text())
    for field in ("entries", "files"):
        changed = json.loads(json.dumps(manifest))
        changed[field][bad] = changed[field]["m" if field == "entries" else "m.safetensors"]
        (path / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(CheckpointError, match="invalid (entry name|file record)"):
            load_checkpoint(tmp_path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    load_checkpoint(tmp_path)


def test_a_file_replaced_by_a_symlink_out_of_the_step_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", 1, m=_model(0), save_rng=False)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(path / "m.safetensors", outside)  # the same bytes: the hash alone would accept it
    (path / "m.safetensors").unlink()
    (path / "m.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(tmp_path / "ckpt", m=_model(1))


# ------------------------------------------------------------------ loaders: identity, all-or-nothing


def _folder(root: Path, names: list[str], size: int = 20) -> ImageFolder:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", (size, size), (i * 20, 0, 0)).save(root / n)
    return ImageFolder(root)


def test_loader_over_other_files_of_the_same_length_restores_nothing(tmp_path: Path) -> None:
    data = _folder(tmp_path / "a", [f"{i}.png" for i in range(8)])
    loader = TrainLoader(data, 2, seed=1)
    next(loader)
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    save_checkpoint(tmp_path / "ckpt", 1, model=model, opt=opt, data=loader)
    variants = {
        "renamed": _folder(tmp_path / "b", [f"x{i}.png" for i in range(8)]),
        "resized": _folder(tmp_path / "c", [f"{i}.png" for i in range(8)], size=24),
    }
    for what, other in variants.items():
        target, target_loader = _model(5), TrainLoader(other, 2, seed=1)
        target_opt = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
        before = [p.clone() for p in target.parameters()]
        rng_before = torch.get_rng_state().clone()
        with pytest.raises(CheckpointError, match="data set changed"):
            load_checkpoint(tmp_path / "ckpt", model=target, opt=target_opt, data=target_loader)
        assert all(torch.equal(a, b) for a, b in zip(target.parameters(), before)), what
        assert target_loader.epoch == 0 and target_loader.batch_in_epoch == 0
        assert torch.equal(torch.get_rng_state(), rng_before)
    same = TrainLoader(_folder(tmp_path / "a", []), 2, seed=1)  # the same files, listed again
    load_checkpoint(tmp_path / "ckpt", data=same)
    assert same.batch_in_epoch == 1


def test_resume_where_nothing_identifies_the_data_is_refused(tmp_path: Path) -> None:
    ds = TensorDataset(torch.arange(8.0))
    loader = TrainLoader(ds, 2)
    loader.skip_to(1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="nothing identifies the data"):
        TrainLoader(ds, 2).load_state_dict(state)
    named = TrainLoader(ds, 2, data_id="arange-8")
    named.skip_to(1)
    again = TrainLoader(ds, 2, data_id="arange-8")
    again.load_state_dict(named.state_dict())
    assert again.batch_in_epoch == 1
    with pytest.raises(ValueError, match="data set changed"):
        TrainLoader(ds, 2, data_id="arange-8-v2").load_state_dict(named.state_dict())


def test_manifest_hash_records_are_what_the_files_hold(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, m=_model(0), t=torch.ones(2))
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    for name, rec in files.items():
        data = (path / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
