"""Reading the code blocks of the Markdown docs, for ``tests/test_docs.py``.

One extractor for every page. A fenced block may be preceded (on the nearest non-blank line) by a
directive in an HTML comment, invisible on the rendered page:

``<!-- docs-test: skip (reason) -->``
    the block is not run; the reason is mandatory and is reported by the test.
``<!-- docs-test: slow (reason) -->``
    the block runs only when ``DMVAE_DOCS_SLOW=1`` (tens of seconds of CPU: real-size feature
    networks, ``torch.compile``); otherwise it is skipped like the above.

A page may also hold hidden setup code, run where it stands (like Sphinx's ``testsetup``), for
fragments that use the reader's own objects (a data loader, an optimiser)::

    <!-- docs-test: setup
    loader = [(torch.rand(2, 3, 64, 64) * 2 - 1, torch.tensor([0, 1]))]
    -->

Setup code stands in for what the page says the reader already has; it never repairs a block.

A Python block is run as written, in order, in one namespace per page. Shell blocks are checked
against the command-line parsers (``dmvae`` sub-commands and their options, the ``--help`` of the
example scripts); they are not run.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Block", "Command", "commands", "extract_blocks", "shape_claims"]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*(?:\((?P<reason>.*)\))?\s*-->$")
_SETUP = re.compile(r"^<!--\s*docs-test:\s*setup\s*$")
DIRECTIVES = ("skip", "slow")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    page: Path
    line: int  # 1-based line of the first code line (the line after the opening fence)
    lang: str  # the info string's first word, lower case ("" when absent)
    code: str  # dedented by the fence's indentation
    skip: str | None = None  # the reason given by a ``docs-test: skip`` / ``slow`` directive
    slow: bool = False  # ``docs-test: slow``: run only with DMVAE_DOCS_SLOW=1
    hidden: bool = False  # a ``docs-test: setup`` comment, not shown on the page

    @property
    def where(self) -> str:
        return f"{self.page.name}:{self.line}"


def extract_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with the directive that precedes it.

    Raises ``ValueError`` for an unclosed fence, an unknown directive or a skip without a reason,
    so a typo cannot silently disable a check.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if _SETUP.match(lines[i].strip()):
            j = i + 1
            while j < len(lines) and lines[j].strip() != "-->":
                j += 1
            if j == len(lines):
                raise ValueError(f"{page.name}:{i + 1}: a docs-test setup comment must end with a line '-->'")
            blocks.append(Block(page, i + 2, "python", "\n".join(lines[i + 1:j]) + "\n", hidden=True))
            i = j + 1
            continue
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if j == len(lines):
            raise ValueError(f"{page.name}:{i + 1}: unclosed code fence {fence!r}")
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[start:j]]
        kind, reason = _directive(page, lines, i)
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", reason, slow=kind == "slow"))
        i = j + 1
    return blocks


def _directive(page: Path, lines: list[str], fence_index: int) -> tuple[str | None, str | None]:
    """``(kind, reason)`` of the directive just above a fence, or ``(None, None)``."""
    k = fence_index - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    if k < 0 or not lines[k].strip().startswith("<!--"):
        return None, None
    text = lines[k].strip()
    m = _DIRECTIVE.match(text)
    if "docs-test" not in text:
        return None, None
    if not m or m["kind"] not in DIRECTIVES:
        raise ValueError(f"{page.name}:{k + 1}: unknown docs-test directive {text!r}; "
                         f"expected '<!-- docs-test: skip (reason) -->' or '<!-- docs-test: slow (reason) -->'")
    if not (m["reason"] or "").strip():
        raise ValueError(f"{page.name}:{k + 1}: a docs-test {m['kind']} needs a reason in parentheses")
    return m["kind"], m["reason"].strip()


# ---- claims written in comments -----------------------------------------------------------------

_SHAPE_CLAIM = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*)\s*=[^#]*#.*?\((?P<dims>\d+(?:\s*,\s*\d+)+)\)")


def shape_claims(code: str) -> list[tuple[int, str, tuple[int, ...]]]:
    """``(line, name, shape)`` for lines like ``z = vae.encode(x)  # (4, 32, 16, 16) ...``.

    The first all-integer tuple of the comment is the claimed shape of the assigned name.
    """
    out = []
    for n, line in enumerate(code.splitlines(), 1):
        m = _SHAPE_CLAIM.match(line)
        if m:
            out.append((n, m["name"], tuple(int(d) for d in m["dims"].split(","))))
    return out


# ---- shell commands -----------------------------------------------------------------------------

SHELL_LANGS = ("bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Command:
    """A ``dmvae ...`` or ``python examples/x.py ...`` command written in a shell block."""

    where: str
    program: str  # "dmvae" or the script path ("examples/train_tokenizer.py")
    args: tuple[str, ...]
    elided: bool  # the line contains "..." (an elision): only the sub-command and options are checked


def commands(block: Block) -> list[Command]:
    """The ``dmvae`` / ``python examples|benchmarks/*.py`` invocations of a shell block."""
    out: list[Command] = []
    logical: list[tuple[int, str]] = []
    pending, first = "", 0
    for n, line in enumerate(block.code.splitlines()):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append((first, pending + line))
        pending = ""
    for n, line in logical:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as e:
            raise ValueError(f"{block.page.name}:{block.line + n}: cannot split {line!r}: {e}") from e
        for segment in _segments(tokens):
            cmd = _command(segment, f"{block.page.name}:{block.line + n}")
            if cmd is not None:
                out.append(cmd)
    return out


def _segments(tokens: list[str]) -> list[list[str]]:
    segs: list[list[str]] = [[]]
    for tok in tokens:
        if tok in ("&&", "||", ";", "|"):
            segs.append([])
        else:
            segs[-1].append(tok)
    return [s for s in segs if s]


def _command(tokens: list[str], where: str) -> Command | None:
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    elided = "..." in tokens
    exe = Path(tokens[0]).name
    if exe == "dmvae":
        return Command(where, "dmvae", tuple(tokens[1:]), elided)
    if exe.startswith("python") or exe == "torchrun":
        rest = tokens[1:]
        if "-m" in rest and rest[rest.index("-m") + 1:rest.index("-m") + 2] == ["dmvae"]:
            return Command(where, "dmvae", tuple(rest[rest.index("-m") + 2:]), elided)
        scripts = [t for t in rest if re.match(r"^(examples|benchmarks)/\w+\.py$", t)]
        if scripts:
            i = rest.index(scripts[0])
            return Command(where, scripts[0], tuple(rest[i + 1:]), elided)
    return None
