"""The ``dmvae`` command line.

Each sub-command lives in a module ``dmvae.cli.cmd_<name>`` that defines
``register(subparsers)``; :data:`COMMANDS` lists them (plain imports, so the import contract sees
every dependency; a new command adds one line here).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dmvae._version import __version__
from dmvae.cli import (
    cmd_autoencoder,
    cmd_cache,
    cmd_convert,
    cmd_demo,
    cmd_eval,
    cmd_info,
    cmd_sample,
)

#: The sub-command modules, each with ``register(subparsers)``.
COMMANDS = (cmd_autoencoder, cmd_cache, cmd_convert, cmd_demo, cmd_eval, cmd_info, cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmvae",
        description="Distribution-Matching VAE: autoencoder, LatentDiT, priors and tools.",
    )
    parser.add_argument("--version", action="version", version=f"dmvae {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a problem with the user's input or environment and are shown as
    one line: bad values (``ValueError``, which the library raises for every invalid input),
    unknown preset / prior names (``UnknownNameError``, with "did you mean"), files (``OSError``: missing, existing, read-only, disk full; the message names the path),
    unfinished shards, CUDA out of memory. ``TypeError`` / ``KeyError`` / other ``RuntimeError``
    from our code are bugs and keep their traceback."""
    import torch

    from dmvae._registry import UnknownNameError
    from dmvae.npz import IncompleteShardsError

    return (ValueError, UnknownNameError, OSError, IncompleteShardsError, torch.OutOfMemoryError)


def _silence_stdout() -> None:
    """After a broken pipe (``dmvae info --json | head``): send further output nowhere, so the
    interpreter's final flush does not raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from dmvae.cli._common import progress_as_lines

    with progress_as_lines():  # progress bars in a log file: periodic lines, no \r flood
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if hasattr(args, "threads"):  # every command that computes (the one place threads are set)
            from dmvae.cli._common import apply_threads

            apply_threads(args.threads)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the handler, not at exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell tool killed by the pipe returns
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if getattr(args, "debug", False):
            raise
        print(f"dmvae {args.command}: error: {_message(e)}", file=sys.stderr)
        return 1


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    text = _unwrap_worker_error(str(e))
    return _in_flag_names(text) if text else type(e).__name__


def _unwrap_worker_error(text: str) -> str:
    """An error raised inside a DataLoader worker reaches the main process as the same type with
    torch's whole worker traceback as its message; keep the original message and name the worker."""
    import re

    m = re.match(r"Caught (\w+) in DataLoader worker process (\d+)\.\nOriginal Traceback \(most recent call last\):\n"
                 r".*^\1: (.*?)\s*\Z", text, re.DOTALL | re.MULTILINE)
    return f"{m.group(3)} (in DataLoader worker process {m.group(2)})" if m else text


#: The library's errors name Python arguments; on the command line the same advice names the flag.
_FLAG_SPELLINGS: tuple[tuple[str, str], ...] = (
    (r"pass config= \(a LatentDiTConfig, a dict or a preset name\)", "pass --dit-config (a model name or a config.json)"),
    (r"pass config= \(a \w+, a dict or a preset name\)", "pass --config (a preset name or a config.json)"),
    (r"LPIPS\(weights=[^)]*\)\)?", "--lpips-weights FILE"),
    (r"--inception PATH, weights=PATH or ", "--inception PATH or "),
    (r"pass token=\)", "log in with `hf auth login` or set HF_TOKEN)"),
    (r"\bor use pretrained=False for tests\b", "or evaluate without LPIPS"),
)


def _in_flag_names(text: str) -> str:
    import re

    for pattern, flag in _FLAG_SPELLINGS:
        text = re.sub(pattern, flag, text)
    return text



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
