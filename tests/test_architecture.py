"""The package's import structure (docs/architecture.md): layers, no cycles, no hidden imports,
small modules. Fast: one in-process import-linter run and an AST scan of the sources."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

SRC = Path(__file__).resolve().parents[1] / "src" / "dmvae"
PYPROJECT = SRC.parents[1] / "pyproject.toml"
MAX_LINES = 500


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_import_contract_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    """pyproject's [tool.importlinter] layers contract: imports point downward only and every
    module sits in exactly one layer (exhaustive)."""
    code = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_no_import_cycles() -> None:
    """The layers contract allows imports inside a layer; none of them may close a cycle."""
    graph = grimp.build_graph("dmvae")
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep] if dep in path else [module, dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)


_DYNAMIC_CALLS = {"import_module", "__import__", "iter_modules", "spec_from_file_location"}
_MODULE_CLASS = re.compile(r"^dmvae(\.\w+)*:\w+$")


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_dynamic_imports_of_dmvae(path: Path) -> None:
    """dmvae reaches its own modules with import statements only (no importlib, no
    "module:Class" strings), so the contract above sees every dependency. Third-party plugins
    (entry points) are loaded through importlib.metadata, which this allows."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _DYNAMIC_CALLS:
                found.append(f"line {node.lineno}: {name}()")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_CLASS.match(node.value):
            found.append(f"line {node.lineno}: {node.value!r}")
    assert not found, f"{path.relative_to(SRC)}: {found}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_is_at_most_500_lines(path: Path) -> None:
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (at most {MAX_LINES}): split it by job"


_APP = ("cli", "demo", "experiments", "integrations", "__main__")


def _library_sources() -> list[Path]:
    """The modules below the app floor (the package root ``__init__`` is above every floor)."""
    return [p for p in _sources()
            if p != SRC / "__init__.py" and p.relative_to(SRC).parts[0].removesuffix(".py") not in _APP]


@pytest.mark.parametrize("path", _library_sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_library_floors_import_names_from_their_homes(path: Path) -> None:
    """Below the app floor, ``from dmvae import X`` may only name a submodule: a public name taken
    from the package root would hide which floor it comes from (the root imports every floor)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    submodules = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    bad = [f"line {node.lineno}: {alias.name}" for node in ast.walk(tree)
           if isinstance(node, ast.ImportFrom) and node.module == "dmvae" and node.level == 0
           for alias in node.names if alias.name not in submodules]
    assert not bad, f"{path.relative_to(SRC)} imports from the dmvae root: {bad}"


def test_convert_is_pure() -> None:
    """dmvae.convert looks at checkpoints already in memory: it imports no model, reads no file and
    writes nothing (reading and saving are dmvae.conversion's, above the models)."""
    graph = grimp.build_graph("dmvae")
    assert graph.find_modules_directly_imported_by("dmvae.convert") <= {"dmvae.files"}
    tree = ast.parse((SRC / "convert.py").read_text(encoding="utf-8"))
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not {c for c in calls if re.match(r"(open|load|read_|save|write)", c)}, calls
