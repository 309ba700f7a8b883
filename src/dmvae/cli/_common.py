"""The shared vocabulary of the ``dmvae`` sub-commands and their one-line user errors.

One spelling per concept, used by every command:

=====================  ===========================================================================
option                 meaning
=====================  ===========================================================================
``--model``            the autoencoder: our directory, a file, a Hub repo id (``add_model_args``)
``--config``           a preset name or a ``config.json`` for weights without one
``--ema / --no-ema``   EMA or raw weights of a reference checkpoint (default: the file's default)
``--dit``              the LatentDiT (``add_dit_args``), with ``--dit-config``, ``--dit-ema/--no-dit-ema``
``-o / --out``         the output file or directory
``--overwrite``        replace existing outputs (otherwise refused before any work)
``--quiet``            hide progress bars
``--device``           ``cpu``, ``cuda``, ``cuda:1`` ... (default: cuda if available)
``--batch-size``       items per model call
``--seed``             base random seed
``--threads``          torch CPU threads (:func:`default_threads`; set in one place, :func:`apply_threads`)
``--json``             print the result as JSON on stdout (otherwise: human text)
=====================  ===========================================================================

Numbers are parsed by :func:`int_range` /
:func:`float_range`, which refuse NaN, infinities and values out of range at parse time.
Outputs are checked (:func:`check_output_file`, :func:`check_output_files`) before the work, and
:func:`writing` turns an ``OSError`` during a write into one that names the path.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HelpFormatter",
    "LineStream",
    "add_command",
    "add_dit_args",
    "add_model_args",
    "add_output_args",
    "add_threads_arg",
    "apply_threads",
    "batched",
    "check_output_file",
    "check_output_files",
    "check_weights_source",
    "config_arg",
    "default_device",
    "default_num_workers",
    "default_threads",
    "float_range",
    "int_range",
    "load_autoencoder",
    "load_dit",
    "progress_as_lines",
    "writing",
]


# ################################################################################################
# parsers, help and aliases
# ################################################################################################


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to every option whose
    default is meaningful and whose help does not mention one: not for required options, on/off
    switches (``--quiet``, ``--no-tf32``: their name says it), or defaults that are None / empty.
    ``--x / --no-x`` pairs show the default switch by name. The examples use it too."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace(" (default: %(default)s)", "")
        default = action.default
        if "default" in text or not action.option_strings or action.required:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(default, bool):
                return text
            on = next(o for o in action.option_strings if not o.startswith("--no-"))
            shown = on if default else "--no-" + on[2:]
            return f"{text} (default: {shown})".strip()
        if (
            action.nargs == 0
            or default is None
            or default is argparse.SUPPRESS
            or (isinstance(default, (list, tuple, str)) and len(default) == 0)
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".strip()

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):  # type: ignore[override]
        if action.metavar == "" or (action.metavar is None and action.choices is None and not default_metavar):
            return super()._metavar_formatter(action, "VALUE")  # never an empty ``[]`` in the usage
        return super()._metavar_formatter(action, default_metavar)


def add_command(subparsers: Any, name: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """The sub-command ``name``, which calls ``run(args)``, with the shared help formatter.

    ``run``'s docstring is the command's help, stated once: its first paragraph is the summary in
    ``dmvae --help``, the rest (line breaks kept) the description of ``dmvae NAME --help``.
    """
    import inspect

    summary, _, description = inspect.cleandoc(run.__doc__ or "").partition("\n\n")  # no docstring under -OO
    parser = subparsers.add_parser(name, help=" ".join(summary.split()), description=description or summary,
                                   formatter_class=HelpFormatter)  # fmt: skip
    parser.set_defaults(func=run)
    return parser


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an int in ``[low, high]``."""

    def parse(text: str) -> int:
        from dmvae.checks import check_int  # torch: imported when an option is parsed, not for --help

        return _checked(text, int, "an integer", check_int, low, high)

    parse.__name__ = "int"
    return parse


def float_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """argparse type: a finite float in the interval (``low_open`` / ``high_open`` exclude the ends)."""

    def parse(text: str) -> float:
        from dmvae.checks import check_range

        return _checked(text, float, "a number", check_range, low, high, low_open=low_open, high_open=high_open)

    parse.__name__ = "float"
    return parse


def _checked(text: str, convert: Callable[[str], Any], kind: str, check: Callable[..., Any], *args: Any,
             **kwargs: Any) -> Any:
    """``text`` converted, then ``check`` (a :mod:`dmvae.checks` function) as an argparse type check:
    errors without the value's name (argparse puts the option's flag in front)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    try:
        return check("value", value, *args, **kwargs)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None


def add_model_args(parser: argparse.ArgumentParser, *, default: str | None = "sen-ye/dmvae") -> None:
    """``--model``, ``--config``, ``--ema/--no-ema``, ``--device`` (the autoencoder)."""
    parser.add_argument(
        "--model",
        default=default,
        required=default is None,
        help="autoencoder: our directory, a .safetensors / reference .pt file or a Hugging Face repo id",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="preset name (dmvae-l, ...) or config.json for weights without a config (reference .pt files)",
    )
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA (--ema) or raw (--no-ema) weights of a reference checkpoint (default: the raw "
        "weights for a reference vae.pt, as the release is evaluated)",
    )
    add_device_arg(parser)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads`` (every command that computes has both)."""
    if not any("--device" in a.option_strings for a in parser._actions):
        parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_threads_arg(parser)


def add_threads_arg(parser: argparse.ArgumentParser, *, default: int | None = None, why: str = "") -> None:
    """``--threads N``: torch CPU threads, applied by ``dmvae.cli.main`` (:func:`apply_threads`)."""
    if any("--threads" in a.option_strings for a in parser._actions):
        return
    shown = f"default: {default}{why}" if default is not None else f"default: {default_threads()} on this machine, " \
        "the usable CPUs (1 to 8) or $OMP_NUM_THREADS"
    parser.add_argument("--threads", type=int_range(1), default=default, metavar="N",
                        help=f"torch CPU threads per process ({shown})")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch CPU threads per process when ``--threads`` is not given.

    ``$OMP_NUM_THREADS`` when set (torchrun sets 1 per process); otherwise the usable CPUs shared by
    the local torchrun processes, at least 1 and at most 8. Measured on a quiet 2-core VM
    (``benchmarks/threads.py``, docs/performance.md): 2 threads beat 1 by 1.30x on 20 steps of the
    CPU stage 1 and by 1.69x on Heun CFG sampling. On a machine shared with other jobs fewer threads
    win (issue 21 measured a busy 2-core VM: 106 s with 2 threads vs 21 s with 1 for a 30-step stage
    1): pass ``--threads`` (or set ``OMP_NUM_THREADS``) there. The cap of 8 is a guard for large
    shared hosts, not a measurement.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    procs = int(local) if local.isdigit() and int(local) >= 1 else 1
    return max(1, min(8, _usable_cpus() // procs))


def apply_threads(threads: int | None) -> int:
    """The one place that sets torch's CPU threads (CLI and examples): ``threads`` or
    :func:`default_threads`. Returns the number set."""
    import torch

    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def add_dit_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--dit``, ``--dit-config``, ``--dit-ema/--no-dit-ema``, ``--dit-filename`` (the LatentDiT)."""
    parser.add_argument("--dit", required=required, default=None,
                        help="LatentDiT: our directory, .safetensors, reference ep*.pt, or a Hugging Face repo id")
    parser.add_argument("--dit-config", default=None,
                        help="preset name or config.json for DiT weights without a config; default: the stored "
                        "config.json (LightningDiT-XL/1 for a reference ep*.pt)")
    parser.add_argument("--dit-ema", action=argparse.BooleanOptionalAction, default=True,
                        help="EMA (--dit-ema) or raw (--no-dit-ema) weights of a reference DiT checkpoint")
    parser.add_argument("--dit-filename", default=None, help="file inside a DiT directory / repo, e.g. ep800.pt")


def add_output_args(parser: argparse.ArgumentParser, *, what: str, required: bool = True) -> None:
    """``-o/--out``, ``--overwrite``, ``--quiet``."""
    parser.add_argument("-o", "--out", required=required, default=None, help=what)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused otherwise)")
    add_quiet_arg(parser)


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="hide progress bars")


# ################################################################################################
# progress in log files
# ################################################################################################


class LineStream:
    """stderr for a log file: progress bars (text ended by ``\\r``) become one line at most every
    ``every`` seconds, ordinary text passes through line by line."""

    def __init__(self, stream, every: float = 30.0) -> None:
        self._stream, self._every, self._buf, self._last = stream, every, "", float("-inf")

    def write(self, text: str) -> int:
        import time

        self._buf += text
        while True:
            cut = min((i for i in (self._buf.find("\r"), self._buf.find("\n")) if i >= 0), default=-1)
            if cut < 0:
                break
            piece, ended_by, self._buf = self._buf[:cut], self._buf[cut], self._buf[cut + 1 :]
            piece = piece.replace("\x1b[A", "").rstrip()
            if not piece.strip():
                continue
            if ended_by == "\r":  # a bar frame about to be overwritten: keep one per period
                now = time.monotonic()
                if now - self._last < self._every:
                    continue
                self._last = now
            self._stream.write(piece + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def progress_as_lines(every: float = 30.0) -> Iterator[None]:
    """While active, and only when stderr is not a terminal: progress bars written to stderr come
    out as one line every ``every`` seconds (and their last state), not a stream of ``\\r`` frames.
    Used by ``dmvae`` and the stage examples."""
    stderr = sys.stderr
    if stderr.isatty() or isinstance(stderr, LineStream):
        yield
        return
    sys.stderr = LineStream(stderr, every)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = stderr


# ################################################################################################
# loading
# ################################################################################################


def default_device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_num_workers(limit: int = 4) -> int:
    """Data-loading worker processes that fit this machine: ``min(limit, usable CPUs - 1)``."""
    return max(0, min(limit, _usable_cpus() - 1))


def config_arg(value: str | None) -> Any:
    """A preset name, or the parsed contents of a ``config.json`` path."""
    if value is not None and value.endswith(".json"):
        from dmvae.files import read_json

        return read_json(value, "config file")
    return value


def check_weights_source(flag: str, value: str, *, config_flag: str = "--config") -> None:
    """A registered preset name given where trained weights are expected (``--model dmvae-l``):
    say that it is an architecture, not weights, and how to get weights. The name is looked up in
    the one model registry (:data:`dmvae._registry.MODELS`, as ``create_model`` does)."""
    from dmvae._registry import MODELS
    from dmvae.models import list_models  # noqa: F401 - importing it fills the registry

    if Path(os.path.expanduser(value)).exists() or "://" in value:
        return
    if value in MODELS:
        raise ValueError(
            f"{flag} {value}: {value!r} is an architecture (a model preset), not trained weights. Give weights: "
            f"a directory written by save_pretrained, a .safetensors / reference .pt file with {config_flag} "
            f"{value}, or a Hugging Face repo id such as sen-ye/dmvae (to fetch it for offline use: "
            f"hf download sen-ye/dmvae). `dmvae info {value}` describes the architecture; "
            f"dmvae.create_model({value!r}) builds it with random weights."
        )


def load_autoencoder(args: argparse.Namespace):
    """``DMVAE.from_pretrained`` from ``--model``, ``--config``, ``--ema``, ``--device``."""
    from dmvae.autoencoder import DMVAE

    check_weights_source("--model", args.model)
    return DMVAE.from_pretrained(
        args.model, config=config_arg(args.config), use_ema=args.ema, device=default_device(args.device)
    )


def load_dit(args: argparse.Namespace, device: str):
    """``LatentDiT.from_pretrained`` from ``--dit``, ``--dit-config``, ``--dit-ema``, ``--dit-filename``."""
    from dmvae.dit import LatentDiT

    check_weights_source("--dit", args.dit, config_flag="--dit-config")
    return LatentDiT.from_pretrained(
        args.dit, config=config_arg(args.dit_config), use_ema=args.dit_ema, filename=args.dit_filename,
        device=device,
    )  # fmt: skip


# ################################################################################################
# inputs and outputs
# ################################################################################################


def batched(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _check_writable_dir(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    anc = path
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(anc))
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "no permission to write in this directory", str(anc))


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Before any work: refuse an existing ``path`` unless ``overwrite``, and a place we cannot write."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "the output is a directory, expected a file path", str(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    _check_writable_dir(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "no permission to replace this file", str(path))
    return path


def check_output_files(out_dir: str | os.PathLike[str], names: Sequence[str], *, overwrite: bool) -> Path:
    """Before any work: ``out_dir`` must be (or can become) a writable directory, and none of
    ``out_dir/name`` may exist unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the output exists and is not a directory", str(out))
    _check_writable_dir(out)
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise FileExistsError(f"{out} already holds {shown}; pass --overwrite to replace them")
    return out


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an ``OSError`` without a file name (``ENOSPC`` from a write) as one naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
