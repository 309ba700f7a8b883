"""Files: atomic writes and safe readers.

Every file the library writes or reads goes through here:

* **Atomic writes** (:func:`atomic_write`, :func:`atomic_write_bytes`, :func:`atomic_write_text`,
  :func:`atomic_save_safetensors`): the data goes to a temporary file in the destination
  directory, is flushed and ``fsync``-ed, gets the permissions of a normally created file
  (``0o666 & ~umask``, not ``mkstemp``'s ``0o600``) and is moved into place with ``os.replace``.
  A reader sees the old file or the new one, never a mixture; an interrupted write leaves no
  partial file.
* **Output replacement** (:func:`replace_output_dir`): a directory is deleted only if it carries
  the tool's own marker file and is neither an input nor a parent of an input.
* **Safe readers** (:func:`read_safetensors`, :func:`read_torch_checkpoint`, :func:`read_json`):
  no pickled code is ever executed (``torch.load(weights_only=True)``); every failure names the
  file (and, for JSON, the position and the field being read).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "MARKER_NAME",
    "CheckpointError",
    "OutputReplaceError",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "discard_dir",
    "file_sha256",
    "marker_tool",
    "read_json",
    "read_safetensors",
    "read_safetensors_header",
    "read_state_dict_file",
    "read_torch_checkpoint",
    "remove_tree",
    "replace_output_dir",
    "replace_refusal",
    "require_file",
    "write_marker",
]

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, wrong keys or wrong shapes."""


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set-and-restore (the only portable way to read it)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: ...`` writes ``path`` all at once or not at all.

    The file object belongs to a temporary file next to ``path``; on a clean exit it is flushed,
    fsync-ed, given the normal mode under the umask and renamed over ``path``. On an exception the
    temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0o600; a saved file is not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory entry (makes a rename durable); a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (moved to CPU, made contiguous; aliases copied) to safetensors bytes."""
    from safetensors.torch import save

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"cannot save {k!r}: expected a tensor, got {type(v).__name__}")
        if v.is_meta:
            raise ValueError(f"cannot save {k!r}: it is on the meta device (it holds no data)")
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:  # safetensors refuses tensors that share memory (tied weights, views)
            v = v.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[k] = v
    return save(out, metadata=metadata)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save tensors as a safetensors file, atomically. Shared storage is copied, not deduplicated."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


# --------------------------------------------------------------------------------------------
# safe readers
# --------------------------------------------------------------------------------------------


def require_file(path: PathLike, what: str) -> Path:
    """``path`` as a ``Path`` if it is an existing file; else ``FileNotFoundError`` naming ``what``."""
    path = Path(path).expanduser()
    if not path.is_file():
        where = "a directory, expected a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{what} not found: {path} ({where})")
    return path


def read_safetensors(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; corrupt or truncated files raise :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = require_file(path, "weights file")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e


MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own limit (100 MB)


def read_safetensors_header(path: PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor table ``{name: {"dtype", "shape", "data_offsets"}}`` and the metadata of a
    safetensors file, read without loading any tensor. The file's size must be exactly the
    header's plus the data it lists (a truncated or padded file raises :class:`CheckpointError`)."""
    import struct

    path = require_file(path, "safetensors file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise CheckpointError(f"{path}: header length {n} does not fit the file of {size} bytes "
                                      "(corrupt or truncated)")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not isinstance(entry.get("shape"), list)):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        end = max(end, offsets[1])
    if size != 8 + n + end:
        raise CheckpointError(f"{path}: {size} bytes, the header lists {8 + n + end} (truncated or damaged)")
    return header, meta


def file_sha256(path: PathLike, chunk: int = 2**22) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pickle_error_types() -> tuple[type[BaseException], ...]:
    """What ``torch.load(weights_only=True)`` raises for a corrupt or code-carrying file."""
    import pickle

    return (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, OSError)


def read_torch_checkpoint(path: PathLike) -> Any:
    """Read a ``.pt`` / ``.pth`` file with ``weights_only=True`` (never executes pickled code)."""
    path = require_file(path, "checkpoint file")
    try:
        # mmap avoids holding a second copy of multi-GB release files (zip format only)
        if zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle_error_types() as e:
        raise CheckpointError(
            f"could not read {path} with torch.load(weights_only=True): {e}. dmvae never unpickles "
            "arbitrary objects; if this file is trusted and holds more than tensors, re-save its "
            "state dicts with torch.save(state_dict) or convert it to safetensors."
        ) from e


def read_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``.safetensors`` file or a ``.pt``/``.pth`` state dict
    (one holding ``{"state_dict": {...}}`` is unwrapped). Anything else: :class:`CheckpointError`."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_torch_checkpoint(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} should hold a flat dict of tensors (a state dict), got {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else "")
        )
    return {str(k): v for k, v in obj.items()}


_KEY_RE = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file. Errors name the file, the line/column and the last field opened before
    the error (``"depth"`` in ``{"depth": 2,,}``)."""
    path = require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} ({what}) is not UTF-8 text: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        keys = _KEY_RE.findall(text[: e.pos])
        near = f", in or after field {keys[-1]!r}" if keys else ""
        raise ValueError(
            f"{path} ({what}) is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{near}"
        ) from e


# --------------------------------------------------------------------------------------------
# replacing output directories: only what this tool made, never an input
# --------------------------------------------------------------------------------------------

MARKER_NAME = ".dmvae-output.json"


class OutputReplaceError(FileExistsError):
    """An output directory that :func:`replace_output_dir` refuses to delete (and why)."""


def write_marker(directory: PathLike, tool: str) -> Path:
    """Mark ``directory`` as an output of ``tool`` (``.dmvae-output.json``); only a directory with
    this marker is ever deleted by :func:`replace_output_dir`."""
    return atomic_write_text(Path(directory) / MARKER_NAME, json.dumps({"tool": tool}) + "\n")


def marker_tool(directory: PathLike) -> str | None:
    """The tool named by ``directory``'s marker, or None (no marker, a symlinked marker, or an unreadable one)."""
    marker = Path(directory) / MARKER_NAME
    try:
        if not marker.is_file() or marker.is_symlink():
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tool = data.get("tool") if isinstance(data, dict) else None
    return tool if isinstance(tool, str) else None


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def replace_refusal(path: PathLike, *, tool: str, inputs: Any = ()) -> str | None:
    """Why :func:`replace_output_dir` would refuse to delete ``path`` (None: it may be deleted).

    The rule: ``path`` is a real directory (not a symlink), carries ``tool``'s own marker, and is
    neither one of ``inputs`` nor a parent of one (paths compared after resolving symlinks)."""
    path = Path(path)
    if path.is_symlink():
        return "it is a symbolic link (dmvae never deletes through a link)"
    if not path.is_dir():
        return "it is not a directory"
    real = _real(path)
    for inp in inputs:
        r = _real(inp)
        if r == real:
            return f"it is an input of this run ({inp})"
        if real in r.parents:
            return f"it contains an input of this run ({inp})"
    owner = marker_tool(path)
    if owner != tool:
        return (f"it was not made by dmvae {tool} (no {MARKER_NAME} marker)" if owner is None
                else f"it was made by dmvae {owner}, not by dmvae {tool}")
    return None


def remove_tree(path: PathLike, *, on_step: Callable[[str], None] | None = None) -> None:
    """Delete a directory tree file by file, never following a symbolic link (a link is removed
    itself, never what it points to). ``on_step`` is called after each removal with ``"unlink"``
    or ``"rmdir"`` (the fault-injection point of the kill trials)."""
    step = on_step or (lambda _stage: None)
    if os.path.islink(path):
        os.unlink(path)
        step("unlink")
        return
    for root, dirs, names in os.walk(path, topdown=False):
        for name in names:
            os.unlink(os.path.join(root, name))
            step("unlink")
        for name in dirs:
            p = os.path.join(root, name)
            os.unlink(p) if os.path.islink(p) else os.rmdir(p)
    os.rmdir(path)
    step("rmdir")


def discard_dir(path: PathLike, trash_name: str, *, on_step: Callable[[str], None] | None = None) -> None:
    """Rename-then-delete: make directory ``path`` invisible with one atomic rename to the hidden
    sibling ``trash_name`` (made durable), then delete it with :func:`remove_tree`. A crash leaves
    either the whole directory under its name or a leftover under ``trash_name``, never a
    half-deleted directory under its name; ``on_step("discard-renamed")`` follows the rename."""
    path = Path(path)
    trash = path.parent / trash_name
    os.rename(path, trash)
    fsync_dir(path.parent)
    if on_step is not None:
        on_step("discard-renamed")
    remove_tree(trash, on_step=on_step)


def _deleting_name(path: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(path.name)}\.deleting-[0-9a-f]{{8}}")


def replace_output_dir(path: PathLike, *, tool: str, inputs: Any = ()) -> Path:
    """Make ``path`` a fresh, empty output directory of ``tool`` (with its marker).

    An existing ``path`` is deleted only under the rule of :func:`replace_refusal`, otherwise
    :class:`OutputReplaceError` names the reason and the fix. Deletion is rename-then-delete
    (:func:`discard_dir`): the directory is first renamed to a hidden ``.<name>.deleting-*``
    sibling, so a crash leaves no half-deleted output under the output's name; such leftovers of
    an interrupted replacement (real directories, never links) are removed by the next call."""
    import uuid

    path = Path(path)
    if path.exists() or path.is_symlink():
        why = replace_refusal(path, tool=tool, inputs=inputs)
        if why is not None:
            raise OutputReplaceError(f"refusing to replace {path}: {why}; choose another output directory "
                                     "or delete it yourself")
        discard_dir(path, f".{path.name}.deleting-{uuid.uuid4().hex[:8]}")
    if path.parent.is_dir():
        leftover = _deleting_name(path)
        for p in path.parent.iterdir():
            if leftover.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                remove_tree(p)
    path.mkdir(parents=True)
    write_marker(path, tool)
    return path
