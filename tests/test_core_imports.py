"""The math core imports only torch/numpy and a few stdlib modules: no I/O, no CLI, no serialization."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import ddpmctl

CORE = ("schedules", "losses", "diffusion", "respace", "resample", "ddgan")
ALLOWED_ROOTS = {"torch", "numpy", "math", "typing", "enum", "dataclasses", "__future__", "functools"}
# ddpmctl.choices: the Literal types of the options (standard library only), e.g. the variance types.
ALLOWED_EXACT = {"collections.abc", "ddpmctl.choices"} | {f"ddpmctl.{m}" for m in CORE}
FORBIDDEN = ("safetensors", "PIL", "typer", "rich", "json", "pathlib", "pydantic", "os", "io", "pickle")


def _imports(module: str) -> list[str]:
    path = Path(ddpmctl.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the ddpmctl package
                names.append("ddpmctl." + (node.module or ""))
            else:
                names.append(node.module or "")
    return names


def _allowed(name: str) -> bool:
    return name in ALLOWED_EXACT or name.split(".")[0] in ALLOWED_ROOTS


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_only_allowed_libraries(module: str) -> None:
    names = _imports(module)
    assert names, f"{module} imports nothing? the parser found no imports"
    bad = [n for n in names if not _allowed(n)]
    assert not bad, f"ddpmctl/{module}.py imports {bad}; the math core may use only torch/numpy/stdlib math"
    assert not [n for n in names if n.split(".")[0] in FORBIDDEN]


def test_the_checker_catches_forbidden_imports() -> None:
    for name in FORBIDDEN:
        assert not _allowed(name)
    assert not _allowed("collections")  # only collections.abc
    assert not _allowed("ddpmctl.checkpoint") and not _allowed("ddpmctl.config")


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_cleanly(module: str) -> None:
    importlib.import_module(f"ddpmctl.{module}")


def test_contract_names_exist() -> None:
    from ddpmctl.diffusion import GaussianDiffusion
    from ddpmctl.losses import discretized_gaussian_log_likelihood, normal_kl
    from ddpmctl.resample import LossSecondMomentResampler, UniformSampler
    from ddpmctl.respace import respace, space_timesteps
    from ddpmctl.schedules import beta_schedule

    for method in ("q_sample", "q_posterior_mean_variance", "p_mean_variance", "p_sample", "ddim_sample",
                   "vb_terms_bpd", "prior_bpd", "training_losses", "calc_bpd_loop", "predict_xstart_from_eps",
                   "predict_eps_from_xstart", "predict_xstart_from_v"):
        assert callable(getattr(GaussianDiffusion, method))
    assert all(callable(f) for f in (normal_kl, discretized_gaussian_log_likelihood, respace, space_timesteps,
                                     beta_schedule, UniformSampler, LossSecondMomentResampler))


# --------------------------------------------------------------------------------------------------------------
# Package structure: config is a leaf, and no module of ddpmctl is in an import cycle


PACKAGE = Path(ddpmctl.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ddpmctl_imports(path: Path, *, module_level_only: bool) -> set[str]:
    """The ddpmctl modules ``path`` imports (``from ddpmctl import x`` counts as ddpmctl.x when that is a module).

    Imports under ``if TYPE_CHECKING:`` never run and do not count. With ``module_level_only`` the imports inside
    functions (deferred until called) are left out too.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if not (module_level_only and in_function):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in known}


def _graph(*, module_level_only: bool) -> dict[str, set[str]]:
    return {_module_name(p): _ddpmctl_imports(p, module_level_only=module_level_only) - {_module_name(p)}
            for p in sorted(PACKAGE.rglob("*.py"))}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


# A package's __init__ that re-exports names lazily (PEP 562 __getattr__) imports its submodules only when a name is
# asked for; every submodule imports the package itself (Python loads parents first), so counting the package's
# lazy targets as edges would make every module part of one cycle. The eager imports of __init__ do count.
def _graph_without_lazy_exports(*, module_level_only: bool) -> dict[str, set[str]]:
    graph = _graph(module_level_only=module_level_only)
    for node, targets in graph.items():
        graph[node] = {t for t in targets if t != "ddpmctl"}
    return graph


def test_config_is_a_leaf() -> None:
    # config only describes; build.py constructs. Its imports: pydantic, the stdlib and the option Literals of
    # ddpmctl.choices, which itself imports nothing but the standard library.
    imports = _imports("config")
    assert [n for n in imports if n.startswith("ddpmctl")] == ["ddpmctl.choices"], imports
    assert {n.split(".")[0] for n in imports} <= {"__future__", "re", "typing", "pydantic", "ddpmctl"}, imports
    assert {n.split(".")[0] for n in _imports("choices")} <= {"__future__", "typing"}


def test_no_module_of_ddpmctl_is_in_an_import_cycle() -> None:
    # Module-level imports (what runs at import time) AND the imports deferred into functions: a deferred import
    # that closes a loop is a cycle of responsibilities even if Python tolerates it.
    for module_level_only in (True, False):
        cycles = _cycles(_graph_without_lazy_exports(module_level_only=module_level_only))
        assert not cycles, f"import cycles ({'module level' if module_level_only else 'with deferred imports'}): " \
                           f"{cycles}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # And the parser sees a real edge: checkpoint imports config and build.
    graph = _graph(module_level_only=True)
    assert {"ddpmctl.config", "ddpmctl.build"} <= graph["ddpmctl.checkpoint"]
    assert "ddpmctl.cli.common" in graph["ddpmctl.cli.train"]
