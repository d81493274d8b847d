"""The sampler contract over every installed sampler, the registry with hand-built entry points, options, SampleRNG."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel

import ddpmctl
from ddpmctl import samplers
from ddpmctl.errors import SamplerError, UnknownSamplerError
from ddpmctl.samplers import Sampler, SampleRNG, StepInfo, available_samplers, get_sampler, parse_options
from ddpmctl.testing import check_sampler

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ("ancestral", "strided", "ddim")


# ---------------------------------------------------------------------------------------------------------------
# The contract suite over every installed sampler


@pytest.mark.parametrize("name", sorted(n for n, e in available_samplers().items() if e.ok))
def test_installed_sampler_passes_contract(name: str) -> None:
    check_sampler(get_sampler(name))


def test_builtins_are_installed() -> None:
    entries = available_samplers()
    for name in BUILTINS:
        assert entries[name].ok, entries[name].error
        assert entries[name].package and entries[name].package.startswith("ddpmctl ")


class _GoodDDIMish(Sampler):
    """A minimal correct sampler (deterministic DDIM on the full chain) to mutate into broken ones."""

    name = "good"
    description = "a test sampler"

    def num_steps(self, checkpoint: Any, steps: int | None) -> int:
        return checkpoint.diffusion.num_timesteps

    def _eps_noise(self, x: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        return rng.randn_like(x)

    def sample(self, checkpoint: Any, x_T: torch.Tensor, *, steps: int | None, rng: SampleRNG, callback: Any = None,
               model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        d, x = checkpoint.diffusion, x_T
        n = d.num_timesteps
        for i, k in enumerate(range(n - 1, -1, -1)):
            t = torch.full((x.shape[0],), k, dtype=torch.int64)
            with torch.no_grad():
                out = d.ddim_sample(checkpoint.model, x, t, eta=0.5, noise=self._eps_noise(x, rng),
                                    model_kwargs=self._kwargs(model_kwargs))
            x = out["sample"]
            self._report(callback, StepInfo(index=i, total=n, t=k, x=x, pred_xstart=out["pred_xstart"]))
        return x

    def _kwargs(self, model_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        return model_kwargs

    def _report(self, callback: Any, info: StepInfo) -> None:
        if callback is not None:
            callback(info)


class _GlobalRNG(_GoodDDIMish):
    def _eps_noise(self, x: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        return torch.randn_like(x)


class _NoKwargs(_GoodDDIMish):
    def _kwargs(self, model_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        return None


class _SilentSteps(_GoodDDIMish):
    def _report(self, callback: Any, info: StepInfo) -> None:
        if callback is not None and info.index % 2 == 0:
            callback(info)


class _LooseOptions(_GoodDDIMish):
    class Options(BaseModel):
        eta: float = 0.0


class _NoName(_GoodDDIMish):
    name = ""


class _WrongLimit(_GoodDDIMish):
    """Returns the first step's pred_xstart instead of finishing the chain."""

    def sample(self, checkpoint: Any, x_T: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        first: list[torch.Tensor] = []
        kwargs = dict(kwargs)
        user = kwargs.pop("callback", None)

        def keep(info: StepInfo) -> None:
            first.append(info.x)
            if user is not None:
                user(info)

        super().sample(checkpoint, x_T, callback=keep, **kwargs)
        return first[0]


def test_check_sampler_accepts_a_correct_sampler() -> None:
    check_sampler(_GoodDDIMish)


@pytest.mark.parametrize(("cls", "message"), [
    (_GlobalRNG, "global RNG"),
    (_NoKwargs, "model_kwargs"),
    (_SilentSteps, "callback"),
    (_LooseOptions, "unknown keys"),
    (_NoName, "lowercase CLI name"),
    (_WrongLimit, "does not recover"),
])
def test_check_sampler_catches_broken_samplers(cls: type[Sampler], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_sampler(cls)


# ---------------------------------------------------------------------------------------------------------------
# The registry, with hand-built entry points (never a "surely absent" installed name)

PLUGIN_SOURCE = textwrap.dedent('''
    from ddpmctl import Sampler

    class Fine(Sampler):
        name = "fine"
        description = "works"

    class Misnamed(Sampler):
        name = "other"
        description = "registered under another name"

    class NotASampler:
        name = "plain"
''')


@pytest.fixture()
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    (tmp_path / "fake_ddpmctl_plugins.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "fake_ddpmctl_broken.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = samplers.ENTRY_POINT_GROUP
    eps = [
        importlib.metadata.EntryPoint("fine", "fake_ddpmctl_plugins:Fine", group),
        importlib.metadata.EntryPoint("fine", "fake_ddpmctl_plugins:Fine", group),  # editable-install duplicate
        importlib.metadata.EntryPoint("misnamed", "fake_ddpmctl_plugins:Misnamed", group),
        importlib.metadata.EntryPoint("plain", "fake_ddpmctl_plugins:NotASampler", group),
        importlib.metadata.EntryPoint("broken", "fake_ddpmctl_broken:Thing", group),
        importlib.metadata.EntryPoint("gone", "fake_ddpmctl_missing_module:Thing", group),
        importlib.metadata.EntryPoint("twice", "fake_ddpmctl_plugins:Fine", group),
        importlib.metadata.EntryPoint("twice", "fake_ddpmctl_plugins:Misnamed", group),
        *samplers._entry_points(),  # the real ones keep working beside the broken
    ]
    calls: list[int] = []

    def fake() -> list[importlib.metadata.EntryPoint]:
        calls.append(1)
        return eps

    monkeypatch.setattr(samplers, "_entry_points", fake)
    samplers.reset_registry()
    yield calls
    samplers.reset_registry()
    for module in ("fake_ddpmctl_plugins", "fake_ddpmctl_broken"):
        sys.modules.pop(module, None)


def test_registry_reports_broken_plugins_and_keeps_the_rest(fake_plugins: list[int]) -> None:
    entries = available_samplers()
    assert entries["fine"].ok and entries["fine"].cls is not None and entries["fine"].cls.name == "fine"
    assert "calls itself 'other'" in (entries["misnamed"].error or "")
    assert "not a ddpmctl.Sampler subclass" in (entries["plain"].error or "")
    assert "ImportError: needs libfoo" in (entries["broken"].error or "")
    assert "ModuleNotFoundError" in (entries["gone"].error or "")
    assert "registered more than once" in (entries["twice"].error or "")
    for name in BUILTINS:
        assert entries[name].ok
    assert get_sampler("fine").name == "fine"
    with pytest.raises(SamplerError, match="installed but broken: cannot import"):
        get_sampler("broken")
    with pytest.raises(UnknownSamplerError, match="installed samplers: ancestral, ddim, fine") as info:
        get_sampler("ddmi")
    assert "broken" not in str(info.value)  # only usable ones are offered
    available_samplers()
    assert len(fake_plugins) == 1  # discovery is cached
    samplers.reset_registry()
    available_samplers()
    assert len(fake_plugins) == 2


def test_samplers_command_lists_broken_plugin(fake_plugins: list[int]) -> None:
    import json

    from typer.testing import CliRunner

    from ddpmctl.cli.app import app

    result = CliRunner().invoke(app, ["samplers", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert not rows["broken"]["ok"] and "needs libfoo" in rows["broken"]["error"]
    assert rows["ddim"]["ok"] and rows["fine"]["ok"]
    table = CliRunner().invoke(app, ["samplers"])
    assert table.exit_code == 0, table.output
    # The table wraps long cells at the terminal's width: check the row names, and that the error is shown.
    assert "broken" in table.stdout and "fine" in table.stdout and "ImportErr" in table.stdout


# ---------------------------------------------------------------------------------------------------------------
# Options


def test_parse_options() -> None:
    ddim = get_sampler("ddim")
    options = parse_options(ddim, ["eta=0.5", "spacing=ddim", "clip-denoised=false"])
    assert options.eta == 0.5 and options.spacing == "ddim" and options.clip_denoised is False
    assert parse_options(ddim, []) == ddim.Options()
    with pytest.raises(SamplerError, match=r"no option 'etta' \(its options: eta, spacing, clip_denoised\)"):
        parse_options(ddim, ["etta=1"])
    with pytest.raises(SamplerError, match="key=value"):
        parse_options(ddim, ["eta"])
    with pytest.raises(SamplerError, match="option eta=abc"):
        parse_options(ddim, ["eta=abc"])
    with pytest.raises(SamplerError, match="option eta=-0.1: Input should be greater than or equal to 0"):
        parse_options(ddim, ["eta=-0.1"])
    with pytest.raises(SamplerError, match="given twice"):
        parse_options(ddim, ["eta=1", "eta=2"])
    for bad in (["eta=abc"], ["nope=1"], ["x"]):
        with pytest.raises(SamplerError) as info:
            parse_options(ddim, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(Exception):
        options.eta = 1.0  # frozen


# ---------------------------------------------------------------------------------------------------------------
# SampleRNG


def test_sample_rng_streams_depend_only_on_seed_and_index() -> None:
    whole = SampleRNG(3, range(5))
    part = SampleRNG(3, [3, 4])
    first_whole, first_part = whole.randn((2, 3)), part.randn((2, 3))
    assert torch.equal(first_whole[3:], first_part)
    x = torch.zeros(5, 2, 3, dtype=torch.float64)
    second_whole, second_part = whole.randn_like(x), part.randn_like(x[3:])
    assert second_whole.dtype == torch.float64 and torch.equal(second_whole[3:], second_part)
    assert not torch.equal(first_whole[3], second_whole[3].float())  # the stream moves on
    assert not torch.equal(first_whole[0], first_whole[1])
    assert not torch.equal(SampleRNG(4, [0]).randn((6,)), SampleRNG(3, [0]).randn((6,)))
    # (seed, i) and (i, seed) are different streams (no seed + i style collisions).
    assert not torch.equal(SampleRNG(1, [0]).randn((6,)), SampleRNG(0, [1]).randn((6,)))
    torch.manual_seed(0)
    a = SampleRNG(9, [2]).randn((4,))
    torch.manual_seed(1)
    assert torch.equal(a, SampleRNG(9, [2]).randn((4,)))  # the global RNG plays no part
    with pytest.raises(ValueError):
        whole.randn_like(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# Boundaries: sampler plugins use only ddpmctl's public names (plus torch, pydantic and the standard library)

ALLOWED_TOP = {"__future__", "typing", "math", "dataclasses", "collections", "torch", "pydantic"}
PLUGIN_FILES = sorted((ROOT / "plugins" / "ddpmctl_samplers").glob("*.py")) + [
    ROOT / "examples" / "ddpmctl-dpmsolver" / "ddpmctl_dpmsolver" / "__init__.py"]


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: p.name if p.name != "__init__.py" else p.parent.name)
def test_plugins_import_only_public_names(path: Path) -> None:
    public = set(ddpmctl.__all__)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: the plugin's own package
                continue
            assert node.module is not None
            if node.module == "ddpmctl":
                hidden = {a.name for a in node.names} - public
                assert not hidden, f"{path.name} imports non-public names {sorted(hidden)} from ddpmctl"
            else:
                assert node.module.split(".")[0] in ALLOWED_TOP, f"{path.name} imports from {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:  # `import ddpmctl` is fine, `import ddpmctl.diffusion` is not
                assert alias.name.split(".")[0] in ALLOWED_TOP or alias.name == "ddpmctl", (
                    f"{path.name} imports {alias.name}")
