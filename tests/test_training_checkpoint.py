"""Training checkpoints: exact resume, atomicity under an interrupted save, keep-last-N, strictness."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmvae.training.checkpoint as ckpt_mod
from dmvae.files import CheckpointError
from dmvae.training import EMA, latest_checkpoint, linear_warmup, list_checkpoints, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    from skimage import data

    imgs = []
    for im in (data.astronaut(), data.coffee()[:, :400], data.chelsea()[:, :300]):
        t = torch.from_numpy(im).permute(2, 0, 1).float()[None] / 127.5 - 1
        imgs.append(F.interpolate(t, size=(32, 32), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(imgs)


class _AE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 4, stride=4)
        self.decoder = nn.ConvTranspose2d(8, 3, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))


def _train_step(model, opt, sched, ema, photos) -> float:
    # draws from every RNG the checkpoint restores: torch (crop + noise), numpy and python random
    i = torch.randint(0, 16, (2,))
    x = torch.stack([photos[k % 3, :, i[0] : i[0] + 16, i[1] : i[1] + 16] for k in range(3)])
    x = x * float(np.random.uniform(0.8, 1.0)) + random.uniform(-0.05, 0.05)
    noisy = x + 0.1 * torch.randn_like(x)
    loss = (model(noisy) - x).abs().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    ema.update()
    return loss.item()


def _setup(seed: int):
    torch.manual_seed(seed)
    model = _AE()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.005)
    sched = linear_warmup(opt, warmup_steps=10)
    ema = EMA(model, decay=0.9)
    return model, opt, sched, ema


@dataclasses.dataclass
class _Args:
    lr: float = 1e-2
    name: str = "test"

    def to_dict(self):
        return dataclasses.asdict(self)


def test_resume_reproduces_next_steps_exactly(tmp_path, photos) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model, opt, sched, ema = _setup(0)
    losses = [_train_step(model, opt, sched, ema, photos) for _ in range(3)]
    path = save_checkpoint(tmp_path, 3, model=model, opt=opt, sched=sched, ema=ema, args=_Args(), epoch=1,
                           seen=torch.tensor([48]))  # fmt: skip
    assert path.name == "step_00000003" and (path / "model.safetensors").is_file()
    cont = [_train_step(model, opt, sched, ema, photos) for _ in range(2)]
    assert losses[0] > cont[-1]  # it does train
    final_params = {k: v.clone() for k, v in model.state_dict().items()}

    # scramble all RNGs and rebuild every object with other weights, then resume
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model2, opt2, sched2, ema2 = _setup(1)
    ck = load_checkpoint(tmp_path, model=model2, opt=opt2, sched=sched2, ema=ema2)
    assert ck.step == 3
    assert ck["args"] == {"lr": 1e-2, "name": "test"} and ck["epoch"] == 1
    assert torch.equal(ck["seen"], torch.tensor([48]))
    resumed = [_train_step(model2, opt2, sched2, ema2, photos) for _ in range(2)]
    assert resumed == cont  # bitwise: same losses
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final_params[k]), k
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for k, v in ema2.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k


def test_interrupted_save_keeps_previous(tmp_path, photos, monkeypatch) -> None:
    model, opt, sched, ema = _setup(0)
    save_checkpoint(tmp_path, 1, model=model, opt=opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt, sched, ema, photos)

    real_replace = ckpt_mod.os.replace

    def crash(src, dst):  # the temp directory is fully written; the rename "crashes"
        assert any(p.name == "manifest.json" for p in ckpt_mod.Path(src).iterdir())
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model=model, opt=opt)
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)

    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    fresh, fopt, _, _ = _setup(5)
    ck = load_checkpoint(tmp_path, model=fresh, opt=fopt)
    assert ck.step == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])

    # a hard crash leaves a partial temp directory behind: ignored, then cleaned by the next save
    junk = tmp_path / ".tmp-step_00000002-999-deadbeef"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    save_checkpoint(tmp_path, 2, model=model)
    assert not junk.exists()
    assert latest_checkpoint(tmp_path).name == "step_00000002"


def test_resave_same_step_interrupted_keeps_old(tmp_path, monkeypatch) -> None:
    m = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 5, model=m)
    calls = {"n": 0}
    real_replace = ckpt_mod.os.replace

    def second_fails(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # old moved aside, then the new one fails to move in
            raise OSError("simulated")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", second_fails)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 5, model=nn.Linear(2, 2))
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    m2 = nn.Linear(2, 2)
    load_checkpoint(tmp_path, model=m2)
    assert torch.equal(m2.weight, m.weight)


def test_keep_last_n(tmp_path) -> None:
    m = nn.Linear(2, 2)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, keep_last=2, model=m)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert load_checkpoint(tmp_path, step=30).step == 30
    with pytest.raises(FileNotFoundError, match="available steps"):
        load_checkpoint(tmp_path, step=10)


def test_strict_and_atomic_restore(tmp_path) -> None:
    save_checkpoint(tmp_path, 0, a=nn.Linear(2, 2), b=nn.Linear(2, 2), save_rng=False)
    a, b_wrong = nn.Linear(2, 2), nn.Linear(2, 3)
    a_before = a.weight.clone()
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path, a=a, b=b_wrong)
    assert torch.equal(a.weight, a_before)  # nothing restored when any module mismatches
    with pytest.raises(KeyError, match="no entries"):
        load_checkpoint(tmp_path, c=nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
    # corrupt weights file -> CheckpointError, not a crash deep in safetensors
    (tmp_path / "step_00000000" / "a.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


def test_entry_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="reserved|invalid"):
        save_checkpoint(tmp_path, 0, step=1)
    with pytest.raises(TypeError, match="cannot checkpoint"):
        save_checkpoint(tmp_path, 0, thing=object())
    assert list_checkpoints(tmp_path) == []  # failed saves leave nothing behind
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, m=nn.Linear(1, 1))
    p = save_checkpoint(tmp_path, 7, m=nn.Linear(1, 1), note={"a": [1, 2]})
    manifest = json.loads((p / "manifest.json").read_text())
    assert manifest["entries"]["m"]["kind"] == "module" and manifest["json"]["note"] == {"a": [1, 2]}
    # a step directory can be passed directly
    assert load_checkpoint(p, restore_rng=False)["note"] == {"a": [1, 2]}


# ---- issue 11: re-saving a step never leaves it missing; failed loads change nothing -----------


def test_resave_step_is_visible_at_every_instant(tmp_path, monkeypatch) -> None:
    """Between the two renames of a re-save the old copy (moved aside) is still listed."""
    old = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 5, model=old, save_rng=False)
    seen = []

    def probe() -> None:
        assert not (tmp_path / "step_00000005").exists()  # really between the two renames
        path = latest_checkpoint(tmp_path)
        m = nn.Linear(2, 2)
        ck = load_checkpoint(tmp_path, model=m, restore_rng=False)
        seen.append((path.name, ck.step, torch.equal(m.weight, old.weight)))

    monkeypatch.setattr(ckpt_mod, "_between_renames", probe)
    save_checkpoint(tmp_path, 5, model=nn.Linear(2, 2), save_rng=False)
    assert len(seen) == 1 and seen[0][0].startswith(".old-step_00000005-") and seen[0][1:] == (5, True)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]  # the aside copy is gone


_CRASH_BETWEEN_RENAMES = """
import os, sys, torch
from torch import nn
import dmvae.training.checkpoint as ck
torch.manual_seed(1)
ck._between_renames = lambda: os._exit(9)  # a hard crash: no cleanup, no except handler
ck.save_checkpoint(sys.argv[1], 5, model=nn.Linear(2, 2), save_rng=False)
"""


@pytest.mark.slow  # a fresh interpreter that dies mid-save
def test_crash_between_renames_keeps_the_step_and_the_next_save_restores_it(tmp_path) -> None:
    import subprocess
    import sys

    old = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 5, model=old, save_rng=False)
    res = subprocess.run([sys.executable, "-c", _CRASH_BETWEEN_RENAMES, str(tmp_path)], timeout=120)
    assert res.returncode == 9
    assert not (tmp_path / "step_00000005").exists()  # the crash hit between the renames
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    m = nn.Linear(2, 2)
    load_checkpoint(tmp_path, model=m, restore_rng=False)
    assert torch.equal(m.weight, old.weight)
    # the next save (another step) must not delete the only copy of step 5: it is put back
    save_checkpoint(tmp_path, 6, model=nn.Linear(2, 2), save_rng=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6]
    assert (tmp_path / "step_00000005" / "manifest.json").is_file()
    m = nn.Linear(2, 2)
    load_checkpoint(tmp_path, 5, model=m, restore_rng=False)
    assert torch.equal(m.weight, old.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005", "step_00000006"]


def test_bool_step_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="non-negative int, got True"):
        save_checkpoint(tmp_path, True, m=nn.Linear(1, 1))
    assert not any(tmp_path.iterdir())


def _state(*objs) -> list[dict]:
    out = []
    for o in objs:
        sd = o.state_dict()
        out.append(json.loads(json.dumps(sd, default=lambda t: t.tolist())) if not isinstance(o, nn.Module)
                   else {k: v.clone() for k, v in sd.items()})
    return out


def _assert_same(before, after) -> None:
    for a, b in zip(before, after):
        if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert a == b


def _trained(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _rehash(step_dir) -> None:
    """Record the current size and SHA-256 of every file in the manifest: a consistent but wrong
    checkpoint, so that the checks behind the content hashes are reached."""
    import hashlib

    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (step_dir / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def test_failed_loads_change_nothing(tmp_path) -> None:
    model, opt, sched = _trained(0)
    save_checkpoint(tmp_path, 1, model=model, opt=opt, sched=sched)
    t_model, t_opt, t_sched = _trained(1)
    before = _state(t_model, t_opt, t_sched)

    # an optimizer over parameters of other shapes
    other = nn.Linear(5, 2)
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    other(torch.randn(1, 5)).sum().backward()
    other_opt.step()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path, model=t_model, opt=other_opt, sched=t_sched)
    _assert_same(before, _state(t_model, t_opt, t_sched))

    # an optimizer of another class (Adam state into SGD) is refused, as the manifest records Adam
    sgd = torch.optim.SGD(t_model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="saved from a Adam.*SGD"):
        load_checkpoint(tmp_path, model=t_model, opt=sgd)
    _assert_same(before, _state(t_model, t_opt, t_sched))

    # a bad rng.pt: the model and the optimizer are not restored either
    step_dir = tmp_path / "step_00000001"
    torch.save([{"torch": torch.zeros(3, dtype=torch.uint8)}], step_dir / "rng.pt")
    with pytest.raises(CheckpointError, match="rng.pt: .* manifest.json records"):  # caught by the hashes
        load_checkpoint(tmp_path, model=t_model, opt=t_opt, sched=t_sched)
    _rehash(step_dir)
    rng_before = torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(CheckpointError, match="rng.pt: invalid RNG state"):
        load_checkpoint(tmp_path, model=t_model, opt=t_opt, sched=t_sched)
    _assert_same(before, _state(t_model, t_opt, t_sched))
    assert torch.equal(torch.get_rng_state(), rng_before[0])
    assert (np.random.get_state()[1] == rng_before[1]).all() and random.getstate() == rng_before[2]
    # with restore_rng=False the same checkpoint loads
    load_checkpoint(tmp_path, restore_rng=False, model=t_model, opt=t_opt, sched=t_sched)
    assert torch.equal(t_model.weight, model.weight)


def test_damaged_checkpoints_name_the_file(tmp_path) -> None:
    p = save_checkpoint(tmp_path, 3, m=nn.Linear(1, 1), t=torch.ones(2), save_rng=False)
    (p / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: tensors.safetensors is missing"):
        load_checkpoint(tmp_path)
    p = save_checkpoint(tmp_path, 4, m=nn.Linear(1, 1), save_rng=False)
    (p / "m.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: m.safetensors is missing"):
        load_checkpoint(tmp_path)
    manifest = json.loads((p / "manifest.json").read_text())
    del manifest["entries"]
    (p / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json: field 'entries' is missing"):
        load_checkpoint(tmp_path)
    (p / "manifest.json").write_text('{"format": "dmvae-training-checkpoint/1", "step": 4,, }')
    with pytest.raises(CheckpointError, match=r"manifest.json.*not valid JSON.*'step'"):
        load_checkpoint(tmp_path)


def test_module_with_meta_or_integer_tensor_is_refused_before_loading(tmp_path) -> None:
    model, opt, _ = _trained(0)
    p = save_checkpoint(tmp_path, 1, model=model, save_rng=False)
    from safetensors.torch import save_file

    save_file({"weight": model.weight.detach().round().to(torch.int64), "bias": model.bias.detach()},
              str(p / "model.safetensors"))
    _rehash(p)
    target = nn.Linear(3, 2)
    before = _state(target)
    with pytest.raises(CheckpointError, match="weight has dtype torch.int64; expected floating-point"):
        load_checkpoint(tmp_path, model=target)
    _assert_same(before, _state(target))
