"""Crash-safe training checkpoints: ``save_checkpoint(dir, step, **state)`` / ``load_checkpoint(dir)``.

Layout (one directory per step, ``keep_last`` newest kept)::

    <dir>/step_00001000/
        manifest.json            # written last: step, format, what each entry is
        vae.safetensors          # nn.Module entries (models, EMA): their state_dict, safetensors
        opt_vae.pt               # objects with state_dict() (optimizers, schedulers, GradScaler):
                                 #   torch.save, read back with torch.load(weights_only=True)
        tensors.safetensors      # plain tensor entries
        rng.pt                   # RNG states (torch CPU, CUDA, numpy, python random), one per rank
        (manifest "json" part)   # int / float / str / list / dict entries and config dataclasses

Everything is written into ``<dir>/.tmp-...`` first and renamed to ``step_XXXXXXXX`` only when
complete, so a crash (or an exception) mid-save leaves the previous checkpoints untouched and
loadable; leftovers are removed by the next successful save. Loading validates every module's keys
and shapes before touching any of them.

Under ``torch.distributed`` call both functions on *every* rank: the RNG states of all ranks are
gathered, rank 0 writes, and each rank restores its own RNG state on load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmvae._utils import unwrap_model
from dmvae.hub import CheckpointError, check_state_dict, read_safetensors, read_torch_checkpoint
from dmvae.training.distributed import barrier, get_rank, get_world_size, is_distributed

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "Checkpoint"]

FORMAT = "dmvae-training-checkpoint/1"
_STEP_RE = re.compile(r"step_(\d+)")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_RESERVED = {"step", "rng", "tensors", "manifest"}


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` found: the step, the directory, and every entry's saved value
    (module / optimizer state dicts, tensors, JSON values), whether or not it was restored."""

    step: int
    path: Path
    state: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.state[name]


# ------------------------------------------------------------------------------------- helpers


def _is_jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses shared / non-contiguous storage (tied weights, views)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path), metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``directory`` as ``(step, path)``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.fullmatch(p.name)
        if m and p.is_dir() and (p / "manifest.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory, or None (use it to decide whether to resume)."""
    ckpts = list_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


# ---------------------------------------------------------------------------------------- save


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    /,
    *,
    keep_last: int | None = None,
    save_rng: bool = True,
    **state: Any,
) -> Path:
    """Write ``state`` as ``<directory>/step_{step:08d}`` atomically; returns that path.

    Each keyword is one entry: an ``nn.Module`` (DDP / compiled wrappers are unwrapped; EMA is a
    module), an object with ``state_dict()`` (optimizer, LR scheduler, GradScaler), a tensor, or a
    JSON-able value / config with ``to_dict()``. ``keep_last`` = how many checkpoints to keep
    (None = all). Names ``step``, ``rng``, ``tensors``, ``manifest`` are reserved.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    for name in state:
        if name in _RESERVED or not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"invalid checkpoint entry name {name!r}: use a Python identifier other than {sorted(_RESERVED)}"
            )

    rng = None
    if save_rng:
        rng = [_rng_state()]
        if is_distributed() and get_world_size() > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * get_world_size()
            dist.all_gather_object(gathered, rng[0])
            rng = gathered

    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    if get_rank() != 0:
        barrier()
        return final

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
        manifest: dict[str, Any] = {"format": FORMAT, "step": step, "entries": {}, "json": {}}
        tensors: dict[str, torch.Tensor] = {}
        for name, obj in state.items():
            obj = unwrap_model(obj)
            if isinstance(obj, nn.Module):
                _save_tensors(obj.state_dict(), tmp / f"{name}.safetensors", {"class": type(obj).__name__})
                manifest["entries"][name] = {"kind": "module", "class": type(obj).__name__}
            elif isinstance(obj, torch.Tensor):
                tensors[name] = obj
                manifest["entries"][name] = {"kind": "tensor"}
            elif callable(getattr(obj, "state_dict", None)):
                _torch_save(obj.state_dict(), tmp / f"{name}.pt")
                manifest["entries"][name] = {"kind": "state_dict", "class": type(obj).__name__}
            elif callable(getattr(obj, "to_dict", None)) and _is_jsonable(obj.to_dict()):
                manifest["json"][name] = obj.to_dict()
                manifest["entries"][name] = {"kind": "json", "class": type(obj).__name__}
            elif _is_jsonable(obj):
                manifest["json"][name] = obj
                manifest["entries"][name] = {"kind": "json"}
            else:
                raise TypeError(
                    f"cannot checkpoint entry {name!r} of type {type(obj).__name__}: expected an nn.Module, "
                    "an object with state_dict(), a tensor, or a JSON-able value"
                )
        if tensors:
            _save_tensors(tensors, tmp / "tensors.safetensors")
        if rng is not None:
            _torch_save(rng, tmp / "rng.pt")
            manifest["rng_ranks"] = len(rng)
        with open(tmp / "manifest.json", "w") as f:  # last: its presence marks a complete write
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)

        if final.exists():  # re-saving a step: move the old one aside, never delete before replacing
            old = directory / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        if old is not None and not final.exists():  # put the previous copy of this step back
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        barrier()

    # Successful: clean leftovers of interrupted saves, then prune.
    for p in directory.iterdir():
        if p.name.startswith((".tmp-step_", ".old-step_")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep_last is not None:
        for _, p in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------- load


def load_checkpoint(
    directory: str | os.PathLike[str],
    step: int | None = None,
    *,
    restore_rng: bool = True,
    **targets: Any,
) -> Checkpoint:
    """Load the newest (or ``step``) checkpoint and restore ``targets`` in place.

    ``directory`` is the checkpoint root (or one ``step_*`` directory). Each keyword target is
    restored from the entry of the same name: modules strictly (all modules are checked before any
    is modified), optimizers / schedulers through ``load_state_dict``. Entries without a target are
    returned in :attr:`Checkpoint.state`. RNG states are restored when ``restore_rng``.

    Raises:
        FileNotFoundError: no complete checkpoint (or not that step) exists.
        CheckpointError: a file is corrupt or a module's keys / shapes do not match.
        KeyError: a target has no entry of that name.
    """
    root = Path(directory)
    if (root / "manifest.json").is_file() and step is None:
        path = root
    else:
        ckpts = list_checkpoints(root)
        if not ckpts:
            raise FileNotFoundError(f"no complete checkpoint (step_*/manifest.json) in {root}")
        if step is None:
            path = ckpts[-1][1]
        else:
            found = dict(ckpts)
            if step not in found:
                raise FileNotFoundError(f"no checkpoint for step {step} in {root}; available steps: {sorted(found)}")
            path = found[step]

    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/manifest.json is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}, expected {FORMAT!r}")
    entries: dict[str, dict[str, Any]] = manifest["entries"]
    missing = sorted(set(targets) - set(entries))
    if missing:
        raise KeyError(f"checkpoint {path} has no entries {missing}; it has {sorted(entries)}")

    values: dict[str, Any] = {}
    tensor_file = path / "tensors.safetensors"
    tensors = read_safetensors(tensor_file) if tensor_file.is_file() else {}
    for name, info in entries.items():
        kind = info["kind"]
        if kind == "module":
            values[name] = read_safetensors(path / f"{name}.safetensors")
        elif kind == "state_dict":
            values[name] = read_torch_checkpoint(path / f"{name}.pt")
        elif kind == "tensor":
            values[name] = tensors[name]
        elif kind == "json":
            values[name] = manifest["json"][name]
        else:
            raise CheckpointError(f"{path}: entry {name!r} has unknown kind {kind!r}")

    # Check every module before modifying anything.
    for name, obj in targets.items():
        obj = unwrap_model(obj)
        if isinstance(obj, nn.Module):
            if entries[name]["kind"] != "module":
                raise CheckpointError(f"entry {name!r} in {path} is a {entries[name]['kind']}, not a module")
            check_state_dict(obj, values[name], source=f"{path.name}/{name}.safetensors")
    for name, obj in targets.items():
        obj = unwrap_model(obj)
        if isinstance(obj, nn.Module):
            obj.load_state_dict(values[name], strict=True)
        elif callable(getattr(obj, "load_state_dict", None)):
            obj.load_state_dict(values[name])
        else:
            raise TypeError(f"target {name!r} ({type(obj).__name__}) has no load_state_dict()")

    if restore_rng and (path / "rng.pt").is_file():
        rng = read_torch_checkpoint(path / "rng.pt")
        rank = get_rank()
        if rank >= len(rng):
            raise CheckpointError(
                f"{path}/rng.pt holds RNG states for {len(rng)} process(es); this is rank {rank} "
                "(resume with the same world size, or restore_rng=False)"
            )
        _set_rng_state(rng[rank])
    return Checkpoint(step=int(manifest["step"]), path=path, state=values)
