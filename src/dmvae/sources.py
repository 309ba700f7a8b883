"""Where a source lives: a local file or directory, a Hugging Face repo id, or ``hf://`` URI.

:func:`locate` and :func:`resolve_file` accept a local file or directory, a Hugging Face repo id
``owner/name``, or ``hf://owner/name[/path/in/repo]``. When the Hub cannot be reached
(``HF_HUB_OFFLINE=1``, or a short connection probe of the endpoint fails) only the local cache is
consulted, so a missing source fails in about a second instead of after network retries.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmvae.files import PathLike, require_file

__all__ = ["Location", "hub_status", "locate", "parse_hf_uri", "resolve_file", "resolve_hub_file"]


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


def resolve_hub_file(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
                     local_files_only: bool | None = None, token: str | bool | None = None) -> Path | None:
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
            f"the repo on a machine with internet access (hf download {self.repo_id})."
        )


def locate(source: PathLike, *, revision: str | None = None, cache_dir: PathLike | None = None,
           local_files_only: bool | None = None, token: str | bool | None = None) -> Location:
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
    if looks_like_repo_id(src) and path.parent.is_dir():  # out/tyny with a local out/: a mistyped path
        held = sorted(p.name for p in path.parent.iterdir())[:12]
        raise FileNotFoundError(
            f"{src!r} does not exist: the local folder {str(path.parent)!r} holds {held} (for the Hugging "
            f"Face repo of that name, write hf://{src})"
        )
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
        return require_file(src, what)
    loc = locate(src, **hub_kwargs)
    if loc.filename is None:
        raise FileNotFoundError(f"{what} {src!r}: name a file inside the repo, 'hf://owner/name/path/in/repo'")
    found = loc.find(loc.filename)
    if found is None:
        raise FileNotFoundError(f"{what}: {loc.not_found([loc.filename])}")
    return found
