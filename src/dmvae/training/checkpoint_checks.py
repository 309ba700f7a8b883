"""Checks of a training checkpoint before anything is restored, and the RNG states it holds.

Used by :func:`dmvae.training.checkpoint.load_checkpoint`: the manifest (format, step, entry names
confined to the step directory, the size and SHA-256 of every file), each file (a regular file
inside the step directory whose bytes match the manifest), optimizer states (groups, shapes) and
RNG states (set on fresh generators). Nothing here modifies a target or a global RNG.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dmvae.files import CheckpointError, file_sha256, read_json

FORMAT = "dmvae-training-checkpoint/1"
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
RESERVED = {"step", "rng", "tensors", "manifest"}
FILE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\.(safetensors|pt)")  # no separators, no "..", not absolute


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: Mapping[str, Any]) -> None:
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


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / "manifest.json"
    try:
        manifest = read_json(file, what="checkpoint manifest")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: unknown checkpoint format {manifest.get('format')!r}, expected {FORMAT!r}")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{file}: field 'step' must be a non-negative int, got {step!r}")
    entries = manifest.get("entries")
    if not isinstance(entries, dict):
        raise CheckpointError(f"{file}: field 'entries' is {'missing' if entries is None else type(entries).__name__}, "
                              "expected an object (the checkpoint is damaged)")
    for name, info in entries.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in RESERVED:
            raise CheckpointError(f"{file}: invalid entry name {name!r} (entry names are identifiers; the "
                                  "checkpoint is damaged or was not written by dmvae)")
        if not isinstance(info, dict) or info.get("kind") not in ("module", "state_dict", "tensor", "json"):
            raise CheckpointError(f"{file}: entry {name!r} has no valid 'kind' ({info!r})")
        if info["kind"] == "json" and name not in manifest.get("json", {}):
            raise CheckpointError(f"{file}: JSON entry {name!r} has no value in field 'json'")
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise CheckpointError(f"{file}: field 'files' must be an object, got {type(files).__name__}")
        for name, rec in files.items():
            if (not isinstance(name, str) or not FILE_RE.fullmatch(name)
                    or not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str)
                    or isinstance(rec.get("size"), bool) or not isinstance(rec.get("size"), int)):
                raise CheckpointError(f"{file}: invalid file record {name!r}: {rec!r} (a file name inside the "
                                      "step directory with its 'size' and 'sha256')")
    return manifest


def entry_file(path: Path, name: str, files: Mapping[str, Any] | None = None) -> Path:
    """``path / name``, a regular file inside the step directory; with the manifest's ``files``
    table, its size and SHA-256 must match the record."""
    file = path / name
    if file.is_symlink() or (file.exists() and file.resolve().parent != path.resolve()):
        raise CheckpointError(f"{file} is a symbolic link or lies outside {path}; checkpoint files must be "
                              "regular files inside the step directory")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing (listed in manifest.json)")
    if files is not None:
        rec = files.get(name)
        if rec is None:
            raise CheckpointError(f"{file} has no size and hash in manifest.json (the checkpoint is damaged)")
        size = file.stat().st_size
        if size != rec["size"]:
            raise CheckpointError(f"{file}: {size} bytes, manifest.json records {rec['size']} (truncated or "
                                  "replaced); load another step")
        if file_sha256(file) != rec["sha256"]:
            raise CheckpointError(f"{file}: content does not match its SHA-256 in manifest.json (the file is "
                                  "damaged or was changed); load another step")
    return file


def check_optimizer(opt: torch.optim.Optimizer, saved: Any, where: str) -> None:
    """Everything ``Optimizer.load_state_dict`` would trip over, checked without changing ``opt``:
    the group structure, and each per-parameter state tensor's shape against its parameter."""
    if not isinstance(saved, Mapping) or "param_groups" not in saved or "state" not in saved:
        raise CheckpointError(f"{where}: not an optimizer state dict (expected 'state' and 'param_groups')")
    groups = saved["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(
            f"{where}: {len(groups)} parameter group(s) saved, the optimizer has {len(opt.param_groups)}"
        )
    params: dict[Any, torch.Tensor] = {}
    for i, (g_saved, g_now) in enumerate(zip(groups, opt.param_groups)):
        if len(g_saved["params"]) != len(g_now["params"]):
            raise CheckpointError(
                f"{where}: parameter group {i} has {len(g_saved['params'])} parameters saved, "
                f"{len(g_now['params'])} in the optimizer"
            )
        params.update(zip(g_saved["params"], g_now["params"]))
    for pid, st in saved["state"].items():
        if pid not in params:
            raise CheckpointError(f"{where}: state for parameter id {pid} that no group lists")
        p = params[pid]
        for key, v in (st.items() if isinstance(st, Mapping) else ()):
            if isinstance(v, torch.Tensor) and v.ndim > 0 and tuple(v.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{where}: state {key!r} of parameter {pid} has shape {tuple(v.shape)}, the "
                    f"parameter has {tuple(p.shape)} (was the optimizer built over another model?)"
                )
            if isinstance(v, torch.Tensor) and (v.is_complex() and not p.is_complex()):
                raise CheckpointError(f"{where}: state {key!r} of parameter {pid} is complex ({v.dtype})")


def check_rng(rng: Any, where: str, rank: int) -> None:
    """Validate RNG states by setting them on fresh generators (the global RNGs are untouched)."""
    import numpy as np

    if not isinstance(rng, list) or not rng:
        raise CheckpointError(f"{where}: expected a list of per-rank RNG states, got {type(rng).__name__}")
    if rank >= len(rng):
        raise CheckpointError(
            f"{where} holds RNG states for {len(rng)} process(es); this is rank {rank} "
            "(resume with the same world size, or restore_rng=False)"
        )
    state = rng[rank]
    try:
        torch.Generator().set_state(state["torch"])
        for s in state.get("cuda") or []:
            if not isinstance(s, torch.Tensor) or s.dtype != torch.uint8:
                raise TypeError("CUDA RNG states must be uint8 tensors")
        n = state["numpy"]
        np.random.RandomState().set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{where}: invalid RNG state for rank {rank}: {type(e).__name__}: {e}") from e
