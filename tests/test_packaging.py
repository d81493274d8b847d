"""What a user installs: the wheel's contents and metadata, Python 3.10 support, a cheap ``import ddpmctl.cli.app``.

Startup *time* is measured by benchmarks/bench_startup.py, never asserted here; this file checks the cause of a
slow start instead: that the CLI module imports no heavy library before a command needs it.
"""

from __future__ import annotations

import ast
import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("ddpmctl", "plugins", "tests", "benchmarks", "examples")
                 for p in (ROOT / folder).rglob("*.py") if "build" not in p.parts)
HEAVY = ("torch", "numpy", "pydantic", "safetensors", "PIL")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_importing_the_cli_imports_no_heavy_library() -> None:
    proc = _run_python("import sys, ddpmctl.cli.app; "
                       f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"`import ddpmctl.cli.app` imported {proc.stdout.strip()}"


def test_version_and_help_run_without_torch() -> None:
    # torch made unimportable: --version and --help must not need it
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['ddpmctl', '{}']; "
            "from ddpmctl.cli.app import main; main()")
    for flag in ("--version", "--help"):
        proc = _run_python(code.format(flag))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "ddpmctl" in proc.stdout


def test_toml_falls_back_to_tomli_without_tomllib() -> None:
    # Python 3.10 has no tomllib: the CLI must import and use the tomli package instead.
    code = ("import sys, types; sys.modules['tomllib'] = None; fake = types.ModuleType('tomli'); "
            "fake.loads = lambda text: {'lr': 0.5}; fake.TOMLDecodeError = ValueError; sys.modules['tomli'] = fake; "
            "import ddpmctl.cli.train as t; from pathlib import Path; import tempfile, os; "
            "d = tempfile.mkdtemp(); p = Path(d, 'c.toml'); p.write_text('lr = 1'); "
            "print(t.tomllib is fake, t._parse_config_file(p))")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True {'lr': 0.5}"


# What Python 3.11+ added that a module cannot import unguarded and still run on 3.10.
NEW_MODULES = {"tomllib", "wsgiref.types"}
NEW_TYPING_NAMES = {"Self", "LiteralString", "Never", "assert_never", "reveal_type", "Required", "NotRequired",
                    "Unpack", "TypeVarTuple", "dataclass_transform", "override", "TypeAliasType"}


def _guarded(parents: list[ast.AST]) -> bool:
    """Inside ``try:`` (an ImportError fallback), ``if sys.version_info ...`` or ``if TYPE_CHECKING``."""
    for node in parents:
        if isinstance(node, ast.Try):
            return True
        if isinstance(node, ast.If) and any(isinstance(n, (ast.Attribute, ast.Name)) and
                                            getattr(n, "attr", getattr(n, "id", None)) in ("version_info",
                                                                                           "TYPE_CHECKING")
                                            for n in ast.walk(node.test)):
            return True
    return False


def python_3_11_imports(tree: ast.AST) -> list[str]:
    """Unguarded imports of what only Python 3.11+ has, as 'line N: import X'."""
    found: list[str] = []

    def visit(node: ast.AST, parents: list[ast.AST]) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name in NEW_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if node.module in NEW_MODULES:
                names = [node.module]
            elif node.module in ("typing", "enum"):
                names = [f"{node.module}.{a.name}" for a in node.names if a.name in NEW_TYPING_NAMES]
        if names and not _guarded(parents):
            found.extend(f"line {node.lineno}: {name}" for name in names)
        for child in ast.iter_child_nodes(node):
            visit(child, [*parents, node])

    visit(tree, [])
    return found


def test_sources_run_on_python_3_10() -> None:
    # The grammar of 3.10, and no unguarded import of a 3.11 module or typing name (those parse fine and fail only
    # when a 3.10 user runs the file).
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))
        problems += [f"{path.relative_to(ROOT)} {found}" for found in python_3_11_imports(tree)]
    assert len(SOURCES) > 50 and not problems, problems


def test_the_3_10_check_finds_unguarded_imports() -> None:
    tree = ast.parse("import tomllib\nfrom typing import Self, Any\ntry:\n    import tomllib\nexcept ImportError:\n"
                     "    import tomli as tomllib\nif sys.version_info >= (3, 11):\n    from typing import Self\n"
                     "def f():\n    import tomllib\n")
    assert python_3_11_imports(tree) == ["line 1: tomllib", "line 2: typing.Self", "line 10: tomllib"]


def test_pyproject_metadata() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the parser ddpmctl itself falls back to (a dependency there)
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["license"] == "MIT" and meta["requires-python"] == ">=3.10"
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in project["build-system"]["requires"])
    deps = {d.split(">=")[0].split(";")[0].strip(): d for d in meta["dependencies"]}
    assert "python_version < '3.11'" in deps["tomli"]
    assert meta["urls"] and meta["classifiers"]
    assert not any(c.startswith("License ::") for c in meta["classifiers"])  # SPDX expression instead


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the checkout (no network, no build isolation: the venv's setuptools)."""
    import shutil

    source = tmp_path_factory.mktemp("src") / "ddpmctl"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", "-w", str(out), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("ddpmctl-*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    for required in ("ddpmctl/__init__.py", "ddpmctl/cli/app.py", "ddpmctl/py.typed", "ddpmctl/assets/digits.npz",
                     "ddpmctl/assets/DIGITS_LICENSE.txt", "ddpmctl_samplers/__init__.py",
                     "ddpmctl_samplers/ancestral.py", "ddpmctl_samplers/ddim.py", "ddpmctl_samplers/strided.py",
                     "ddpmctl_samplers/student.py"):
        assert required in names, required
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    assert any(r.startswith("tomli") and "python_version" in r for r in metadata.get_all("Requires-Dist"))
    assert metadata.get_all("Project-URL")
    assert "ddpmctl = ddpmctl.cli.app:main" in entry_points
    for sampler in ("ancestral", "strided", "ddim", "student"):
        assert f"{sampler} = ddpmctl_samplers." in entry_points
