"""Shape rules of the code base: no function of ddpmctl or its bundled plugins is over 80 lines.

A CLI command's signature is its option declarations (one typer option per parameter), so for the functions of
ddpmctl/cli only the body counts; everywhere else the whole definition does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ddpmctl

ROOT = Path(ddpmctl.__file__).parent
PLUGINS = ROOT.parent / "plugins"
LIMIT = 80


def _functions(path: Path) -> list[tuple[str, int]]:
    """(qualified name, counted lines) of every function in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    cli = path.parent.name == "cli"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = child.body[0].lineno if cli else child.lineno
                found.append((prefix + child.name, child.end_lineno - first + 1))  # type: ignore[operator]
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(tree, "")
    return found


def _long_functions() -> dict[str, int]:
    files = sorted(ROOT.rglob("*.py")) + sorted(PLUGINS.rglob("*.py"))
    return {f"{path.relative_to(ROOT.parent).as_posix()}:{name}": lines
            for path in files for name, lines in _functions(path) if lines > LIMIT}


def test_no_function_is_over_80_lines() -> None:
    long = _long_functions()
    assert not long, f"functions over {LIMIT} lines (split them): {long}"


def test_a_long_function_is_found(tmp_path: Path) -> None:
    # 81 lines in all (def + 80 statements), a method, and a CLI command whose signature does not count.
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "cli").mkdir()
    for path in (tmp_path / "m.py", tmp_path / "cli" / "m.py"):
        path.write_text(f"def long(\n    a: int,\n):\n{body}\n\n\nclass C:\n    def short(self):\n        return 1\n")
    assert dict(_functions(tmp_path / "m.py")) == {"long": 83, "C.short": 2}
    assert dict(_functions(tmp_path / "cli" / "m.py")) == {"long": 80, "C.short": 1}


def test_the_counter_counts() -> None:
    sample = ROOT / "errors.py"
    counted = dict(_functions(sample))
    assert 5 < counted["validation_problem"] < 30
