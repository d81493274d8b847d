"""The math core imports only torch/numpy and a few stdlib modules: no I/O, no CLI, no serialization."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import ddpmctl

CORE = ("schedules", "losses", "diffusion", "respace", "resample")
ALLOWED_ROOTS = {"torch", "numpy", "math", "typing", "enum", "dataclasses", "__future__", "functools"}
ALLOWED_EXACT = {"collections.abc"} | {f"ddpmctl.{m}" for m in CORE}
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
