"""The docs run as written: every Python block of ``docs/*.md`` and ``README.md``, and the command lines.

How the Python blocks run (``tests/_docs.py`` reads them):

* the blocks of one page run in order in one namespace (later blocks use earlier names), in a fresh
  temporary working directory that holds the files the docs name as the user's: ``photo.jpg`` (a
  scikit-image photo), the release files ``vae.pt`` / ``path/to/vae.pt`` / ``ep800.pt`` /
  ``ep400.pt`` / ``ep64.pt`` in the reference layout, ``out/dmvae-l`` (our layout, as written by
  ``dmvae convert``), and a Hugging Face cache holding ``sen-ye/dmvae``;
* **stand-in presets**: the release-size presets (``dmvae-l``, ``dmvae-b``, every
  ``LightningDiT-*``) are swapped for models of the same interface (latent channels, patch, grid,
  classes, latent statistics) but a few layers wide, so ``DMVAE.from_pretrained("sen-ye/dmvae")``
  runs the real loading path, offline, on tiny weights in seconds;
* ``DMVAE_LPIPS_WEIGHTS`` points at a complete LPIPS-VGG file with random weights (the docs' calls
  run; their distances mean nothing);
* without a GPU, ``"cuda"`` in a block reads ``"cpu"`` and ``.cuda()`` reads ``.cpu()``;
* a comment that states a shape, ``z = vae.encode(x)  # (4, 32, 16, 16) ...``, is checked;
* a block that cannot run here is preceded by ``<!-- docs-test: skip (reason) -->``; the reason is
  required, and ``test_skips_are_counted`` bounds how many there are; a block that costs tens of
  seconds of CPU is marked ``<!-- docs-test: slow (reason) -->`` and runs with ``DMVAE_DOCS_SLOW=1``
  (``DMVAE_DOCS_SLOW=1 pytest tests/test_docs.py``), which keeps the default run near a minute;
* a fragment that uses the reader's own objects (``loader``, ``opt``) gets them from a hidden
  ``<!-- docs-test: setup ... -->`` comment just before it (see ``tests/_docs.py``).

Shell blocks are not run; each ``dmvae ...`` command is parsed by the real parser, and each
``python examples/*.py`` / ``benchmarks/*.py`` option must appear in that script's ``--help``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from _docs import SHELL_LANGS, Block, Command, commands, extract_blocks, shape_claims

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
PY_LANGS = ("python", "py")
# Blocks that cannot run here (downloads, ImageNet, paper-scale recipes). Raising this bound is a
# review decision: each new skip hides a block from the test.
MAX_SKIPPED_PYTHON_BLOCKS = 8
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _blocks(page: Path, langs: tuple[str, ...]) -> list[Block]:
    return [b for b in extract_blocks(page) if b.lang in langs]


RUN_SLOW = os.environ.get("DMVAE_DOCS_SLOW", "") not in ("", "0")


def _runs(block: Block) -> bool:
    return block.skip is None or (block.slow and RUN_SLOW)


# pages with at least one Python block to run (test_skips_are_counted bounds the rest)
PY_PAGES = [p for p in PAGES if any(_runs(b) and not b.hidden for b in _blocks(p, PY_LANGS))]


# ---- stand-in presets and the user's files ------------------------------------------------------


def _stand_in_configs() -> tuple[dict, dict]:
    """Small configs with the release interface, keyed by preset name."""
    from dmvae.autoencoder import DMVAEConfig
    from dmvae.dit import LatentDiTConfig

    tiny = DMVAEConfig.from_preset("dmvae-tiny")
    vae = {}
    for name in ("dmvae-l", "dmvae-b"):
        big = DMVAEConfig.from_preset(name)
        vae[name] = tiny.replace(z_channels=big.z_channels, image_size=big.image_size,
                                 patch_size=big.patch_size, latent_mean=big.latent_mean,
                                 latent_scale=big.latent_scale)
    dit = {name: LatentDiTConfig.from_preset(name).replace(depth=1, hidden_size=64, num_heads=2)
           for name in _dit_preset_names()}
    return vae, dit


def _dit_preset_names() -> list[str]:
    from dmvae.models import list_models

    return list_models("LightningDiT-*")


def _install_stand_ins(monkeypatch: pytest.MonkeyPatch, vae: dict, dit: dict) -> None:
    """Point the preset names at the stand-ins for this test only (every lookup goes through here)."""
    try:
        from dmvae._registry import MODELS
    except ImportError:
        MODELS = None
    if MODELS is not None and "dmvae-l" in MODELS and "LightningDiT-XL/1" in MODELS:
        for name, cfg in {**vae, **dit}.items():
            monkeypatch.setitem(MODELS.entries, MODELS.canonical(name), lambda cfg=cfg: cfg.replace())
        return
    from dmvae import autoencoder, dit as dit_module

    for name, cfg in vae.items():
        monkeypatch.setitem(autoencoder._PRESETS, name, lambda cfg=cfg: cfg.replace())
    for name, cfg in dit.items():
        monkeypatch.setitem(dit_module._PRESETS, name, lambda cfg=cfg: cfg.replace())


@pytest.fixture(scope="module")
def docs_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Build the user's files once: tiny weights in the release layouts, a photo, an HF cache."""
    from PIL import Image
    from skimage import data

    from safetensors.torch import save_file

    from dmvae import DMVAE, LatentDiT
    from dmvae.lpips import LPIPS

    root = tmp_path_factory.mktemp("docs-world")
    vae_cfgs, dit_cfgs = _stand_in_configs()
    torch.manual_seed(0)
    vae = DMVAE(vae_cfgs["dmvae-l"])
    torch.save({"vae_wo_ddp": vae.state_dict(), "vae_ema": _perturbed(vae.state_dict())}, root / "vae.pt")
    vae.save_pretrained(root / "out" / "dmvae-l")
    dit = LatentDiT(dit_cfgs["LightningDiT-XL/1"])
    torch.save({"model": dit.state_dict(), "ema": _perturbed(dit.state_dict())}, root / "ep800.pt")
    Image.fromarray(data.astronaut()).save(root / "photo.jpg", quality=90)
    with warnings.catch_warnings():  # random LPIPS weights: the docs' LPIPS() finds a complete file
        warnings.simplefilter("ignore", UserWarning)
        save_file(LPIPS(pretrained=False).state_dict(), root / "lpips_vgg.safetensors")

    snap = root / "hub" / "models--sen-ye--dmvae" / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True)
    (root / "hub" / "models--sen-ye--dmvae" / "refs").mkdir()
    (root / "hub" / "models--sen-ye--dmvae" / "refs" / "main").write_text(HUB_COMMIT)
    shutil.copy(root / "vae.pt", snap / "vae.pt")
    for name in ("ep800.pt", "ep400.pt", "ep64.pt"):
        shutil.copy(root / "ep800.pt", snap / name)
    return root, vae_cfgs, dit_cfgs


def _perturbed(state: dict) -> dict:
    """A second weight set (the "EMA" one) that differs visibly from the first."""
    return {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}


def _user_dir(world: Path, cwd: Path) -> None:
    for name in ("photo.jpg", "vae.pt", "ep800.pt"):
        os.symlink(world / name, cwd / name)
    for name in ("ep400.pt", "ep64.pt"):
        os.symlink(world / "ep800.pt", cwd / name)
    (cwd / "path" / "to").mkdir(parents=True)
    os.symlink(world / "vae.pt", cwd / "path" / "to" / "vae.pt")
    shutil.copytree(world / "out", cwd / "out")  # a copy: pages write into out/


def _as_run_here(code: str) -> str:
    """Blocks run as written: a device must be chosen with ``"cuda" if torch.cuda.is_available()
    else "cpu"`` (a bare ``"cuda"`` fails on a CPU machine, here as for a reader)."""
    return code


# ---- Python blocks ------------------------------------------------------------------------------


@pytest.mark.slow  # runs the documentation
@pytest.mark.parametrize("page", PY_PAGES, ids=lambda p: p.name)
def test_python_blocks_run_as_written(
    page: Path, docs_world: tuple[Path, dict, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    world, vae_cfgs, dit_cfgs = docs_world
    _install_stand_ins(monkeypatch, vae_cfgs, dit_cfgs)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(world / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(world / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DMVAE_LPIPS_WEIGHTS", str(world / "lpips_vgg.safetensors"))
    _user_dir(world, tmp_path)
    monkeypatch.chdir(tmp_path)

    namespace: dict = {"__name__": "__docs__"}
    with _registries_restored():
        _run_blocks(page, namespace)


@contextlib.contextmanager
def _registries_restored():
    """Names a page registers (``@register_prior``...) do not outlive the page."""
    from dmvae._registry import MODELS
    from dmvae.priors.base import PRIORS

    saved = [(reg, dict(reg.entries)) for reg in (MODELS, PRIORS)]
    try:
        yield
    finally:
        for reg, entries in saved:
            reg.entries.clear()
            reg.entries.update(entries)


def _run_blocks(page: Path, namespace: dict) -> None:
    blocks = _blocks(page, PY_LANGS)
    for i, block in enumerate(blocks):
        # hidden setup runs when the next visible block runs
        target = next((b for b in blocks[i:] if not b.hidden), block)
        if not _runs(target):
            continue
        # blank lines in front keep tracebacks on the page's own line numbers
        source = "\n" * (block.line - 1) + _as_run_here(block.code)
        # Hidden setup may only stand in for the reader's files (it writes them); its Python names
        # stay in a namespace of their own, so every visible block needs only visible code.
        target_ns = {"__name__": "__docs_setup__"} if block.hidden else namespace
        try:
            exec(compile(source, str(page), "exec"), target_ns)
        except Exception as e:
            raise AssertionError(f"{block.where}: the block raised {type(e).__name__}: {e}") from e
        for line, name, shape in _checkable_claims(block):
            value = namespace.get(name)
            if isinstance(value, torch.Tensor):
                assert tuple(value.shape) == shape, (
                    f"{page.name}:{block.line + line - 1}: the comment says {name} is {shape}, "
                    f"it is {tuple(value.shape)}")


def _checkable_claims(block: Block) -> list[tuple[int, str, tuple[int, ...]]]:
    # a name assigned more than once in the block: the comment may describe an earlier value
    return [c for c in shape_claims(block.code)
            if len(re.findall(rf"^\s*{c[1]}\s*=[^=]", block.code, flags=re.M)) == 1]


def test_skips_are_counted() -> None:
    blocks = [b for p in PAGES for b in _blocks(p, PY_LANGS) if not b.hidden]
    skipped = [f"{b.where} ({'slow: ' if b.slow else ''}{b.skip})" for b in blocks if b.skip is not None]
    assert len(blocks) >= 20, f"only {len(blocks)} Python blocks found: is the extractor broken?"
    assert len(skipped) <= MAX_SKIPPED_PYTHON_BLOCKS, "too many skipped docs blocks:\n" + "\n".join(skipped)


def test_shape_claims_are_read() -> None:
    """The claim reader finds the claims of the quick start (so the shape checks above are live)."""
    readme = _blocks(REPO / "README.md", PY_LANGS)
    claims = {name: shape for b in readme for _, name, shape in _checkable_claims(b)}
    assert claims.get("latents") == (2, 32, 16, 16)


def test_extractor_rejects_unreasoned_skips(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("<!-- docs-test: skip -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        extract_blocks(page)
    page.write_text("<!-- docs-test: skpi (typo) -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test directive"):
        extract_blocks(page)
    page.write_text("text\n\n<!-- docs-test: skip (needs a GPU) -->\n\n```python\nx = 1\n```\n  ```py\n  y = 2\n  ```\n"
                    "<!-- docs-test: setup\nz = 3\n-->\n")
    a, b, c = extract_blocks(page)
    assert not a.slow and not b.slow
    assert (a.skip, a.line, a.code) == ("needs a GPU", 6, "x = 1\n")
    assert (b.skip, b.lang, b.code) == (None, "py", "y = 2\n")
    assert (c.hidden, c.lang, c.line, c.code) == (True, "python", 12, "z = 3\n")
    page.write_text("<!-- docs-test: setup\nz = 3\n")
    with pytest.raises(ValueError, match="must end"):
        extract_blocks(page)
    page.write_text("<!-- docs-test: slow (a real Inception) -->\n```python\nx = 1\n```\n")
    (d,) = extract_blocks(page)
    assert d.slow and d.skip == "a real Inception"
    page.write_text("<!-- docs-test: slow -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="slow needs a reason"):
        extract_blocks(page)


# ---- command lines ------------------------------------------------------------------------------

_INLINE = re.compile(r"`((?:\.venv/bin/)?dmvae [^`]+|(?:\.venv/bin/)?python (?:examples|benchmarks)/\w+\.py[^`]*)`")
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _inline_commands(page: Path) -> list[Command]:
    """Commands in inline code and plain/text blocks: synopses, checked for names only."""
    out: list[Command] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = [b for b in extract_blocks(page) if not b.hidden]
    shell = {b.line + i for b in blocks if b.lang in SHELL_LANGS for i in range(-1, len(b.code.splitlines()) + 1)}
    plain = {b.line + i for b in blocks if b.lang in ("", "text") for i in range(len(b.code.splitlines()))}
    for n, line in enumerate(lines, 1):
        if n in shell:
            continue
        texts = _INLINE.findall(line)
        if not texts and n in plain and re.match(r"^\s*(\.venv/bin/)?dmvae [a-z]", line):
            texts = [line.split("#")[0]]  # a synopsis line of a text block
        for text in texts:
            tokens = text.replace("[", " ").replace("]", " ").replace("|", " ").split()
            prog = Path(tokens[0]).name if Path(tokens[0]).name != "python" else tokens[1]
            args = tokens[1:] if prog == "dmvae" else tokens[2:]
            out.append(Command(f"{page.name}:{n}", prog, tuple(args), elided=True))
    return out


def _page_commands(page: Path) -> list[Command]:
    out = [c for b in extract_blocks(page) if b.lang in SHELL_LANGS and b.skip is None
           for c in commands(b)]
    return out + _inline_commands(page)


CMD_PAGES = [p for p in PAGES if _page_commands(p)]


def _dmvae_subparsers() -> dict:
    import argparse

    from dmvae.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def _check_dmvae(cmd: Command, parser, subs: dict) -> None:
    """The sub-command exists, every option is a current spelling (not a hidden, deprecated
    alias, not an abbreviation), and a complete command line parses."""
    import argparse

    sub = next((a for a in cmd.args if not a.startswith("-")), None)
    if cmd.elided and (sub is None or sub == "..." or sub.isupper()):  # `dmvae --debug COMMAND ...`
        for opt in _OPTION.findall(" ".join(a for a in cmd.args if a != sub)):
            assert opt.split("=")[0] in parser._option_string_actions, f"{cmd.where}: `dmvae` has no option {opt}"
        return
    assert sub in subs, f"{cmd.where}: `dmvae {sub}` is not a command (known: {sorted(subs)})"
    known = {**parser._option_string_actions, **subs[sub]._option_string_actions}
    for opt in _OPTION.findall(" ".join(cmd.args)):
        opt = opt.split("=")[0]
        assert opt in known, f"{cmd.where}: `dmvae {sub}` has no option {opt}"
        assert known[opt].help is not argparse.SUPPRESS, (
            f"{cmd.where}: `dmvae {sub} {opt}` is a hidden (deprecated) spelling; use the one in --help")
    if cmd.elided:
        return
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(list(cmd.args))
        except SystemExit as e:
            assert e.code == 0, f"{cmd.where}: `dmvae {' '.join(cmd.args)}` does not parse: {err.getvalue()}"


def _script_help(script: str, monkeypatch: pytest.MonkeyPatch) -> str:
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.syspath_prepend(str(path.parent))
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    assert e.value.code == 0, f"{script} --help exited with {e.value.code}"
    return out.getvalue()


@pytest.mark.slow  # checks every documented command against the parsers
@pytest.mark.parametrize("page", CMD_PAGES, ids=lambda p: p.name)
def test_command_lines_exist(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser, subs = _dmvae_subparsers()
    helps: dict[str, str] = {}
    for cmd in _page_commands(page):
        if cmd.program == "dmvae":
            _check_dmvae(cmd, parser, subs)
            continue
        if cmd.program not in helps:
            helps[cmd.program] = _script_help(cmd.program, monkeypatch)
        for opt in _OPTION.findall(" ".join(cmd.args)):
            opt = opt.split("=")[0]
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", helps[cmd.program]), (
                f"{cmd.where}: {cmd.program} has no option {opt}")


def test_command_check_catches_wrong_names() -> None:
    parser, subs = _dmvae_subparsers()
    with pytest.raises(AssertionError, match="no option --no-such-option"):
        _check_dmvae(Command("x.md:1", "dmvae", ("info", "--no-such-option"), True), parser, subs)
    with pytest.raises(AssertionError, match="no option --no-such-option"):
        _check_dmvae(Command("x.md:1", "dmvae", ("info", "dmvae-l", "--no-such-option"), False), parser, subs)
    with pytest.raises(AssertionError, match="is not a command"):
        _check_dmvae(Command("x.md:1", "dmvae", ("no-such-command",), True), parser, subs)
    with pytest.raises(AssertionError, match="does not parse"):
        _check_dmvae(Command("x.md:1", "dmvae", ("info",), False), parser, subs)  # SRC is required


def test_index_links_every_page() -> None:
    index = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"index.md"}
    assert pages - linked == set(), f"docs/index.md does not link {sorted(pages - linked)}"
    assert linked - pages == set(), f"docs/index.md links missing pages {sorted(linked - pages)}"


def test_command_check_refuses_hidden_spellings() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="dmvae")
    sub = parser.add_subparsers().add_parser("run")
    sub.add_argument("--model")
    sub.add_argument("--preset", dest="model", help=argparse.SUPPRESS)  # a deprecated alias
    subs = {"run": sub}
    _check_dmvae(Command("x.md:1", "dmvae", ("run", "--model", "m"), False), parser, subs)
    with pytest.raises(AssertionError, match="hidden"):
        _check_dmvae(Command("x.md:1", "dmvae", ("run", "--preset", "m"), False), parser, subs)
    with pytest.raises(AssertionError, match="no option --mod"):  # an abbreviation argparse would take
        _check_dmvae(Command("x.md:1", "dmvae", ("run", "--mod", "m"), False), parser, subs)


def _resolve(dotted: str):
    """``dmvae.<dotted>`` as a module or a module attribute (ImportError/AttributeError if absent)."""
    import importlib

    try:
        return importlib.import_module(f"dmvae.{dotted}")
    except ModuleNotFoundError:
        module, _, attr = dotted.rpartition(".")
        return getattr(importlib.import_module(f"dmvae.{module}"), attr)


def test_architecture_page_names_exist() -> None:
    """Every module and name the architecture page points to exists (so the page follows moves)."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules_table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    placed = {n.rstrip("/") for row in re.findall(r"^\| \w+ \| (`[^|]+) \|", modules_table, flags=re.M)
              for n in re.findall(r"`([\w.]+)/?`", row)}
    package = REPO / "src" / "dmvae"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert modules <= placed, f"architecture.md places no layer for {sorted(modules - placed)}"
    shared_table = text.split("## Shared pieces", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for row in re.findall(r"^\| \w+ \| (`[^|]+) \|", modules_table, flags=re.M):
        for name in re.findall(r"`([\w.]+)/?`", row):
            if name != "__main__":  # importing it runs the command line
                _resolve(name)
            checked += 1
    for home in re.findall(r"^\|[^|]+\| (`[^|]+) \|$", shared_table, flags=re.M):
        module, _, names = home.partition(":")
        base = module.strip().strip("`")
        target = _resolve(base)
        checked += 1
        for name in re.findall(r"`([\w.]+)`", names):
            if "." in name:
                _resolve(name)
            else:
                assert hasattr(target, name), f"architecture.md: dmvae.{base} has no {name}"
            checked += 1
    assert checked >= 40, f"only {checked} names found in docs/architecture.md: did its tables change form?"


def test_blocks_choose_the_device_safely() -> None:
    """A reader on a CPU machine can run every block: ``"cuda"`` only with a fallback."""
    bad = [b.where for p in PAGES for b in _blocks(p, PY_LANGS)
           if re.search(r"""["']cuda["']|\.cuda\(\)""", b.code) and "cuda.is_available()" not in b.code]
    assert not bad, f"blocks that need a GPU: {bad}"


def test_hidden_setup_names_do_not_reach_the_visible_blocks(tmp_path: Path) -> None:
    """Hidden set-up stands in for the reader's files only: a visible block that uses one of its
    names fails, as it would for a reader who copied the page."""
    page = tmp_path / "p.md"
    page.write_text("<!-- docs-test: setup\nsecret = 1\n-->\n\n```python\ny = secret + 1\n```\n")
    with pytest.raises(AssertionError, match="NameError"):
        _run_blocks(page, {"__name__": "__docs__"})
