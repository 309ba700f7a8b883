"""The one loading-and-saving layer: atomic writes, safe readers, and where a source lives.

Every file the library writes or reads goes through here:

* **Atomic writes** (:func:`atomic_write`, :func:`atomic_write_bytes`, :func:`atomic_write_text`,
  :func:`atomic_save_safetensors`): the data goes to a temporary file in the destination
  directory, is flushed and ``fsync``-ed, gets the permissions of a normally created file
  (``0o666 & ~umask``, not ``mkstemp``'s ``0o600``) and is moved into place with ``os.replace``.
  A reader sees the old file or the new one, never a mixture; an interrupted write leaves no
  partial file.
* **Safe readers** (:func:`read_safetensors`, :func:`read_torch_checkpoint`, :func:`read_json`):
  no pickled code is ever executed (``torch.load(weights_only=True)``); every failure names the
  file (and, for JSON, the position and the field being read).
* **Sources** (:func:`locate`, :func:`resolve_file`): a local file or directory, a Hugging Face
  repo id ``owner/name``, or ``hf://owner/name[/path/in/repo]``. When the Hub cannot be reached
  (``HF_HUB_OFFLINE=1``, or a short connection probe of the endpoint fails) only the local cache
  is consulted, so a missing source fails in about a second instead of after network retries.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CheckpointError",
    "Location",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "hub_status",
    "locate",
    "parse_hf_uri",
    "read_json",
    "read_safetensors",
    "read_state_dict_file",
    "read_torch_checkpoint",
    "resolve_file",
    "resolve_hub_file",
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


def _require_file(path: PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        where = "a directory" if path.is_dir() else "missing"
        raise FileNotFoundError(f"{what} not found: {path} ({where})")
    return path


def read_safetensors(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; corrupt or truncated files raise :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _require_file(path, "weights file")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e


def pickle_error_types() -> tuple[type[BaseException], ...]:
    """What ``torch.load(weights_only=True)`` raises for a corrupt or code-carrying file."""
    import pickle

    return (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, OSError)


def read_torch_checkpoint(path: PathLike) -> Any:
    """Read a ``.pt`` / ``.pth`` file with ``weights_only=True`` (never executes pickled code)."""
    path = _require_file(path, "checkpoint file")
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
    path = _require_file(path, what)
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
# the Hugging Face Hub
# --------------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        return "https://huggingface.co"


_PROBES: dict[str, bool] = {}
_PROBE_LOCK = threading.Lock()
PROBE_TIMEOUT_S = 3.0


def _probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to ``url``'s host (or the HTTPS proxy) be opened within ``timeout``?

    Name resolution runs in a daemon thread so that a hanging resolver cannot block the caller.
    The answer is remembered per URL for the life of the process."""
    import socket
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = proxy if proxy and url.startswith("https") else url
    with _PROBE_LOCK:
        if target in _PROBES:
            return _PROBES[target]
    parts = urlsplit(target if "://" in target else f"http://{target}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    ok: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    result = bool(ok)
    with _PROBE_LOCK:
        _PROBES[target] = result
    return result


def hub_status(local_files_only: bool | None = None) -> tuple[bool, str]:
    """``(online, why)``: whether Hub requests may be made, and a phrase saying why not."""
    if local_files_only:
        return False, "local_files_only=True"
    if _env_flag("HF_HUB_OFFLINE"):
        return False, "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False, "HF_HUB_OFFLINE was set when huggingface_hub was imported"
    except ImportError:  # pragma: no cover
        return False, "huggingface_hub is not installed"
    endpoint = _endpoint()
    if not _probe(endpoint):
        return False, f"{endpoint} did not answer within {PROBE_TIMEOUT_S:g} s"
    return True, ""


def resolve_hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path | None:
    """Path of ``filename`` in ``repo_id`` (downloaded, or from the cache when the Hub cannot be
    reached); ``None`` if the repo has no such file or it is neither cached nor downloadable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    online, _ = hub_status(local_files_only)
    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir,
                local_files_only=not online, token=token,
            )
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def parse_hf_uri(source: str) -> tuple[str, str | None] | None:
    """``"hf://owner/name/path/in/repo"`` -> ``("owner/name", "path/in/repo")`` (path ``None`` for
    ``"hf://owner/name"``); ``None`` for anything that does not start with ``hf://``."""
    if not source.startswith("hf://"):
        return None
    parts = [p for p in source[len("hf://") :].split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"expected 'hf://owner/name' or 'hf://owner/name/path/in/repo', got {source!r}")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def looks_like_repo_id(source: str) -> bool:
    """``owner/name`` with no path-like prefix or weights-file suffix."""
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "/", "~"))
        and not source.endswith((".pt", ".pth", ".safetensors", ".bin", ".json", ".npz"))
    )


@dataclass
class Location:
    """Where a model or file lives: a local file, a local directory, or a Hub repo.

    :meth:`find` returns the path of a named file in it (downloading or reading the Hub cache),
    or ``None``; :meth:`not_found` builds the error that names every place that was looked at."""

    source: str
    local: Path | None = None
    repo_id: str | None = None
    filename: str | None = None  # a file named inside the repo (``hf://owner/name/file``)
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_file(self) -> bool:
        return self.local is not None and self.local.is_file()

    def find(self, name: str) -> Path | None:
        if self.local is not None:
            path = self.local / name
            return path if path.is_file() else None
        assert self.repo_id is not None
        return resolve_hub_file(self.repo_id, name, **self.hub_kwargs)

    def not_found(self, tried: list[str]) -> FileNotFoundError:
        if self.local is not None:
            found = sorted(p.name for p in self.local.iterdir())[:20]
            wanted = " nor ".join(tried) if len(tried) > 1 else tried[0]
            return FileNotFoundError(f"{self.local} holds {'neither ' if len(tried) > 1 else 'no '}{wanted}; found: {found}")
        online, why = hub_status(self.hub_kwargs.get("local_files_only"))
        local = "" if self.source.startswith("hf://") else f"there is no local directory or file {self.source!r}, and "
        if online:
            return FileNotFoundError(
                f"{local}the Hugging Face Hub repo {self.repo_id!r} has none of {tried} (or does not "
                "exist, or is private: pass token=)"
            )
        return FileNotFoundError(
            f"{local}the Hugging Face Hub repo {self.repo_id!r} is not in the local cache (looked for "
            f"{tried}) and the Hub is unreachable ({why}). Pass an existing local path, or download "
            f"the repo on a machine with internet access (huggingface-cli download {self.repo_id})."
        )


def locate(
    source: PathLike,
    *,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Location:
    """Classify ``source``: an existing local file or directory, ``hf://owner/name[/file]``, or a
    Hub repo id ``owner/name``. Anything else raises ``FileNotFoundError`` at once."""
    src = os.fspath(source)
    hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    uri = parse_hf_uri(src)
    if uri is not None:
        return Location(src, repo_id=uri[0], filename=uri[1], hub_kwargs=hub_kwargs)
    path = Path(src).expanduser()
    if path.exists():
        return Location(src, local=path)
    if looks_like_repo_id(src):
        return Location(src, repo_id=src, hub_kwargs=hub_kwargs)
    raise FileNotFoundError(
        f"{src!r} is not an existing file or directory (looked in {Path.cwd()}), nor a Hugging Face "
        "repo id ('owner/name') or 'hf://owner/name/file'"
    )


def resolve_file(source: PathLike, *, what: str = "file", **hub_kwargs: Any) -> Path:
    """One file from a local path or ``hf://owner/name/path/in/repo`` (a bare ``owner/name`` is a
    local path here); errors name ``what``. ``hub_kwargs`` go to :func:`locate`."""
    src = os.fspath(source)
    if parse_hf_uri(src) is None:
        path = Path(src).expanduser()
        if not path.is_file():
            where = "a directory, expected a file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"{what} not found: {path} ({where})")
        return path
    loc = locate(src, **hub_kwargs)
    if loc.filename is None:
        raise FileNotFoundError(f"{what} {src!r}: name a file inside the repo, 'hf://owner/name/path/in/repo'")
    found = loc.find(loc.filename)
    if found is None:
        raise FileNotFoundError(f"{what}: {loc.not_found([loc.filename])}")
    return found
