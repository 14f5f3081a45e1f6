"""The package's shape (docs/design.md): imports run down the data flow only, no function-level imports of
gradgraph modules outside the CLI, no module over ~400 lines."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gradgraph"
MODULES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)

# rank of each part of the package: a module may import parts of lower rank (and its own part)
RANKS = {"errors": 0, "registry": 1, "io": 1, "losses": 1, "oracle": 2, "models": 2, "capture": 3, "graph": 4,
         "threads": 1, "api": 5, "nn": 6, "data": 7, "train": 8, "tasks": 9, "optim": 9.5, "bench": 10, "cli": 11}
LAZY_OK = {"cli.py"}  # the CLI imports a command's module (and torch) when the command runs
MAX_LINES = 400


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path):
    """(imported gradgraph module, line, inside a function?) for every import statement of ``path``."""
    name, tree = _name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    funcs = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            targets = [target] if target.startswith("gradgraph") else []
            if node.module is None:  # "from . import x": x may be a module
                targets = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("gradgraph")]
        else:
            continue
        for t in targets:
            yield t, node.lineno, id(node) in funcs


def test_every_part_has_a_rank():
    parts = {_part(_name(p)) for p in MODULES} - {""}
    assert parts <= set(RANKS), f"add {sorted(parts - set(RANKS))} to RANKS (and to docs/design.md)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_down_the_data_flow(path):
    own = _part(_name(path))
    if not own:  # gradgraph/__init__.py: the lazy public API sits above every stage
        return
    for target, line, _ in _imports(path):
        part = _part(target) or "api"  # "import gradgraph": the public API, which sits at api's rank
        assert part == own or RANKS[part] < RANKS[own], (
            f"{path.relative_to(ROOT)}:{line} imports {target}: '{own}' (rank {RANKS[own]}) may only import "
            f"parts of lower rank, and '{part}' has rank {RANKS[part]}")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_level_imports_of_gradgraph(path):
    if path.relative_to(ROOT).as_posix() in LAZY_OK:
        return
    inside = [(t, line) for t, line, in_function in _imports(path) if in_function]
    assert not inside, f"{path.relative_to(ROOT)} imports gradgraph modules inside functions: {inside}"


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these modules (over {MAX_LINES} lines): {big}"


def test_the_checks_can_fail(tmp_path):
    bad = tmp_path / "gradgraph" / "capture" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ..graph import spec\n\ndef f():\n    from ..nn import layout\n")
    global ROOT
    old, ROOT = ROOT, tmp_path / "gradgraph"
    try:
        found = list(_imports(bad))
    finally:
        ROOT = old
    assert found == [("gradgraph.graph", 1, False), ("gradgraph.nn", 4, True)]
    assert RANKS["graph"] > RANKS["capture"]  # so the first import breaks the rule
