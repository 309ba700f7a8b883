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
loadable; leftovers are removed by the next successful save. ``manifest.json`` records the size and
SHA-256 of every file of the step, checked on load (a flipped byte is an error naming the file);
entry names are confined to the step directory (identifiers only, no symbolic links).

Pruning (``keep_last``) renames a step to ``.del-step_XXXXXXXX-*`` (one atomic rename: from then on
it is invisible) before deleting its files, so a kill at any instant leaves every listed step
complete; half-deleted ``.del-*`` directories are removed by the next save. Re-saving an existing step moves the
old directory aside as ``.old-step_XXXXXXXX-*`` before the new one is renamed in; the aside copy is
complete and :func:`list_checkpoints` counts it for its step until the new directory exists, so at
no instant is the step missing, and the next save puts it back instead of deleting it.

Loading validates everything first (:mod:`dmvae.training.checkpoint_checks`) (manifest, every file, module keys / shapes / dtype kinds,
optimizer class and parameter shapes, scheduler keys, RNG states) and only then restores anything:
a failed load leaves every target and the RNGs as they were.

Under ``torch.distributed`` call both functions on *every* rank: the RNG states of all ranks are
gathered, rank 0 writes, and each rank restores its own RNG state on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmvae._utils import unwrap_model
from dmvae.dist import barrier, get_rank, get_world_size, is_distributed
from dmvae.files import (
    CheckpointError,
    discard_dir,
    fsync_dir,
    read_safetensors,
    read_torch_checkpoint,
    remove_tree,
    safetensors_bytes,
)
from dmvae.hub import check_state_dict
from dmvae.training.checkpoint_checks import (
    FORMAT,
    NAME_RE,
    RESERVED,
    check_optimizer,
    check_rng,
    entry_file,
    read_manifest,
    rng_state,
    set_rng_state,
)

__all__ = ["Checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

_STEP_RE = re.compile(r"step_(\d+)")
_ASIDE_RE = re.compile(r"\.old-step_(\d+)-[0-9a-f]+")
_DELETING_RE = re.compile(r"\.del-step_(\d+)-[0-9a-f]+")


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


def _fault_point(stage: str) -> None:
    """Called at every step of a save and of a prune (a fault-injection point for the kill trials
    of the tests; does nothing)."""


def _write_synced(path: Path, data: bytes, files: dict[str, Any] | None = None) -> None:
    """Write and fsync ``path``; record its size and SHA-256 in ``files`` (the manifest's table)."""
    import hashlib

    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if files is not None:
        files[path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _fault_point("write")


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                  files: dict[str, Any] | None = None) -> None:
    _write_synced(path, safetensors_bytes(tensors, metadata), files)


def _torch_save(obj: Any, path: Path, files: dict[str, Any] | None = None) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    _write_synced(path, buf.getvalue(), files)


def _discard(directory: Path, p: Path) -> None:
    """Make step directory ``p`` invisible with one rename, then delete it (rename-then-delete)."""
    m = _STEP_RE.fullmatch(p.name) or _ASIDE_RE.fullmatch(p.name)
    step = int(m.group(1)) if m else 0
    discard_dir(p, f".del-step_{step:08d}-{uuid.uuid4().hex[:8]}", on_step=_fault_point)


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``directory`` as ``(step, path)``, oldest first.

    A step whose ``step_*`` directory is missing but whose aside copy (``.old-step_*``, left by a
    re-save interrupted between its two renames) is complete is listed with the aside path."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    for p in d.iterdir():
        if (m := _STEP_RE.fullmatch(p.name)) and _is_complete(p):
            found[int(m.group(1))] = p
        elif (m := _ASIDE_RE.fullmatch(p.name)) and _is_complete(p):
            aside.setdefault(int(m.group(1)), p)
    for step, p in aside.items():
        found.setdefault(step, p)
    return sorted(found.items())


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory, or None (use it to decide whether to resume)."""
    ckpts = list_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


def _restore_asides(directory: Path) -> None:
    """Put back aside copies whose step directory is missing (a re-save crashed between renames)."""
    for p in list(directory.iterdir()):
        m = _ASIDE_RE.fullmatch(p.name)
        if m and _is_complete(p):
            final = directory / f"step_{int(m.group(1)):08d}"
            if not final.exists():
                os.rename(p, final)


def _between_renames() -> None:
    """Called after the old directory of a re-saved step was moved aside and before the new one is
    moved in (a fault-injection point for tests; does nothing)."""


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
    module), an object with ``state_dict()`` (optimizer, LR scheduler, GradScaler; its class is
    recorded and checked on load), a tensor, or a JSON-able value / config with ``to_dict()``.
    ``keep_last`` = how many checkpoints to keep (None = all). Names ``step``, ``rng``,
    ``tensors``, ``manifest`` are reserved.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r} ({type(step).__name__})")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    for name in state:
        if name in RESERVED or not NAME_RE.fullmatch(name):
            raise ValueError(
                f"invalid checkpoint entry name {name!r}: use a Python identifier other than {sorted(RESERVED)}"
            )

    rng = None
    if save_rng:
        rng = [rng_state()]
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
    _restore_asides(directory)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
        files: dict[str, Any] = {}
        manifest: dict[str, Any] = {"format": FORMAT, "step": step, "entries": {}, "json": {}, "files": files}
        tensors: dict[str, torch.Tensor] = {}
        for name, obj in state.items():
            obj = unwrap_model(obj)
            if isinstance(obj, nn.Module):
                _save_tensors(obj.state_dict(), tmp / f"{name}.safetensors", {"class": type(obj).__name__}, files)
                manifest["entries"][name] = {"kind": "module", "class": type(obj).__name__}
            elif isinstance(obj, torch.Tensor):
                tensors[name] = obj
                manifest["entries"][name] = {"kind": "tensor"}
            elif callable(getattr(obj, "state_dict", None)):
                _torch_save(obj.state_dict(), tmp / f"{name}.pt", files)
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
            _save_tensors(tensors, tmp / "tensors.safetensors", files=files)
        if rng is not None:
            _torch_save(rng, tmp / "rng.pt", files)
            manifest["rng_ranks"] = len(rng)
        # last: its presence marks a complete write
        _write_synced(tmp / "manifest.json", json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp)

        if final.exists():  # re-saving a step: move the old one aside (still listed), never delete first
            old = directory / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            _between_renames()
            _fault_point("aside")
        os.replace(tmp, final)
        fsync_dir(directory)
        _fault_point("renamed")
    except BaseException:
        if old is not None and not final.exists():  # put the previous copy of this step back
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        barrier()

    # Successful: clean leftovers of interrupted saves and prunes (asides only once their step
    # exists), then prune; every removal of a listed directory is rename-then-delete.
    try:
        for p in sorted(directory.iterdir()):
            if p.is_symlink() or not p.is_dir():
                continue
            if p.name.startswith(".tmp-step_") or _DELETING_RE.fullmatch(p.name):
                remove_tree(p, on_step=_fault_point)
            elif (m := _ASIDE_RE.fullmatch(p.name)) and _is_complete(directory / f"step_{int(m.group(1)):08d}"):
                _discard(directory, p)
        if keep_last is not None:
            for _, p in list_checkpoints(directory)[:-keep_last]:
                _discard(directory, p)
    except OSError as e:  # the checkpoint is saved; a leftover is removed by a later save
        warnings.warn(f"checkpoint {final} saved, but cleaning old files in {directory} failed: {e}", stacklevel=2)
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
    restored from the entry of the same name: modules strictly, optimizers / schedulers through
    ``load_state_dict``. Entries without a target are returned in :attr:`Checkpoint.state`. RNG
    states are restored when ``restore_rng``.

    All or nothing: every file is read and every target checked first (module keys, shapes and
    dtype kinds; optimizer class, groups and state shapes; scheduler class and keys; the RNG
    states) and only then is anything modified.

    Raises:
        FileNotFoundError: no complete checkpoint (or not that step) exists.
        CheckpointError: a file is missing, corrupt or does not match its target.
        KeyError: a target has no entry of that name.
        TypeError: a target cannot be restored (no ``load_state_dict``, or another class).
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, got {step!r}")
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

    manifest = read_manifest(path)
    entries: dict[str, dict[str, Any]] = manifest["entries"]
    files: dict[str, Any] | None = manifest.get("files")
    if files is None:
        warnings.warn(f"{path}/manifest.json records no file hashes (saved by an older dmvae): its files are "
                      "not verified", stacklevel=2)
    missing = sorted(set(targets) - set(entries))
    if missing:
        raise KeyError(f"checkpoint {path} has no entries {missing}; it has {sorted(entries)}")

    # 1. read every file
    values: dict[str, Any] = {}
    tensor_names = [n for n, info in entries.items() if info["kind"] == "tensor"]
    tensors = read_safetensors(entry_file(path, "tensors.safetensors", files)) if tensor_names else {}
    for name, info in entries.items():
        kind = info["kind"]
        if kind == "module":
            values[name] = read_safetensors(entry_file(path, f"{name}.safetensors", files))
        elif kind == "state_dict":
            values[name] = read_torch_checkpoint(entry_file(path, f"{name}.pt", files))
        elif kind == "tensor":
            if name not in tensors:
                raise CheckpointError(f"{path}/tensors.safetensors has no tensor {name!r} (listed in manifest.json)")
            values[name] = tensors[name]
        else:
            values[name] = manifest["json"][name]
    rng = None
    if restore_rng and ("rng_ranks" in manifest or (path / "rng.pt").is_file()):
        rng = read_torch_checkpoint(entry_file(path, "rng.pt", files))
        check_rng(rng, f"{path}/rng.pt", get_rank())

    # 2. check every target against what will be loaded into it
    for name, obj in targets.items():
        obj = unwrap_model(obj)
        kind, saved_class = entries[name]["kind"], entries[name].get("class")
        where = f"{path.name}/{name}"
        if isinstance(obj, nn.Module):
            if kind != "module":
                raise CheckpointError(f"entry {name!r} in {path} is a {kind}, not a module")
            check_state_dict(obj, values[name], source=f"{where}.safetensors")
        elif kind != "state_dict" or not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(
                f"cannot restore target {name!r} ({type(obj).__name__}) from a {kind} entry: modules take "
                "module entries, objects with load_state_dict() take state-dict entries"
            )
        else:
            if saved_class is not None and saved_class != type(obj).__name__:
                raise TypeError(
                    f"entry {name!r} in {path} was saved from a {saved_class}; refusing to load it into a "
                    f"{type(obj).__name__}"
                )
            if isinstance(obj, torch.optim.Optimizer):
                check_optimizer(obj, values[name], f"{where}.pt")
            elif callable(getattr(obj, "check_state_dict", None)):  # loaders: position and data identity
                try:
                    obj.check_state_dict(values[name])
                except ValueError as e:
                    raise CheckpointError(f"{path / name}.pt: {e}") from e
            elif isinstance(values[name], Mapping) and callable(getattr(obj, "state_dict", None)):
                now, saved = set(obj.state_dict()), set(values[name])
                if now and saved != now:
                    raise CheckpointError(
                        f"{where}.pt does not match the {type(obj).__name__}: keys only saved "
                        f"{sorted(saved - now)}, only in the target {sorted(now - saved)}"
                    )

    # 3. restore (nothing above modified anything)
    for name, obj in targets.items():
        obj = unwrap_model(obj)
        if isinstance(obj, nn.Module):
            obj.load_state_dict(values[name], strict=True)
        else:
            obj.load_state_dict(values[name])
    if rng is not None:
        set_rng_state(rng[get_rank()])
    return Checkpoint(step=int(manifest["step"]), path=path, state=values)
