"""The sampler contract over every installed sampler, the registry with hand-built entry points, options, SampleRNG."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel

import ddpmctl
from ddpmctl import samplers
from ddpmctl.config import DiffusionConfig
from ddpmctl.denoiser import CLEAN, Denoiser
from ddpmctl.errors import SamplerError, UnknownSamplerError
from ddpmctl.samplers import Sampler, SampleRNG, StepInfo, available_samplers, get_sampler, parse_options
from ddpmctl.testing import check_sampler

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ("ancestral", "strided", "ddim", "student", "dpmpp-2m", "ddgan", "sscs", "em", "cld-ode")


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
    """A minimal correct sampler (DDIM, eta 0.5) written against contract v2, to mutate into broken ones."""

    api_version = 2
    name = "good"
    description = "a test sampler"

    def _eps_noise(self, x: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        return rng.randn_like(x)

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: Any = None) -> torch.Tensor:
        x = x_T
        for i, t in enumerate(timesteps):
            s = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
            pred = self._predict(denoiser, x, t)
            a, a_s = denoiser.alpha_bar(t), denoiser.alpha_bar(s)
            sigma = 0.5 * ((1 - a_s) / (1 - a) * (1 - a / a_s)) ** 0.5
            x = a_s**0.5 * pred.x0 + (1 - a_s - sigma**2) ** 0.5 * pred.eps + sigma * self._eps_noise(x, noise)
            self._report(callback, StepInfo(index=i, total=len(timesteps), t=t, x=x, pred_xstart=pred.x0))
        return x

    def _predict(self, denoiser: Denoiser, x: torch.Tensor, t: int) -> Any:
        return denoiser.predict(x, t)

    def _report(self, callback: Any, info: StepInfo) -> None:
        if callback is not None:
            callback(info)


class _GlobalRNG(_GoodDDIMish):
    def _eps_noise(self, x: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
        return torch.randn_like(x)


class _OwnNetworkCall(_GoodDDIMish):
    """Calls the network itself, without the class labels the denoiser would pass."""

    def _predict(self, denoiser: Denoiser, x: torch.Tensor, t: int) -> Any:
        return Denoiser(denoiser.network, DiffusionConfig(schedule="cosine", timesteps=denoiser.num_timesteps,
                                                          mean_type="eps", var_type="fixed_small", loss_type="mse"),
                        [t]).predict(x, t) if denoiser.model_kwargs else denoiser.predict(x, t)


class _SilentSteps(_GoodDDIMish):
    def _report(self, callback: Any, info: StepInfo) -> None:
        if callback is not None and info.index % 2 == 0:
            callback(info)


class _LooseOptions(_GoodDDIMish):
    class Options(BaseModel):
        eta: float = 0.0


class _NoName(_GoodDDIMish):
    name = ""


class _Unversioned(_GoodDDIMish):
    api_version = None


class _BottomFirst(_GoodDDIMish):
    """Walks the timesteps from the least noisy one: one step then evaluates t = 0 on pure noise."""

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], **kwargs: Any) -> torch.Tensor:
        if len(timesteps) == 1:
            return denoiser.predict(x_T, 0).x0
        return super().sample(denoiser, x_T, timesteps, **kwargs)


class _WrongLimit(_GoodDDIMish):
    """Returns the first step's x instead of finishing the chain."""

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], **kwargs: Any) -> torch.Tensor:
        first: list[torch.Tensor] = []
        kwargs = dict(kwargs)
        user = kwargs.pop("callback", None)

        def keep(info: StepInfo) -> None:
            first.append(info.x)
            if user is not None:
                user(info)

        super().sample(denoiser, x_T, timesteps, callback=keep, **kwargs)
        return first[0]


def test_check_sampler_accepts_a_correct_sampler() -> None:
    check_sampler(_GoodDDIMish)


@pytest.mark.parametrize(("cls", "message"), [
    (_GlobalRNG, "global RNG"),
    (_OwnNetworkCall, "class labels"),
    (_SilentSteps, "callback"),
    (_LooseOptions, "unknown keys"),
    (_NoName, "lowercase CLI name"),
    (_Unversioned, "api_version"),
    (_BottomFirst, "with one step does not recover the data mean"),
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
        api_version = 2
        name = "fine"
        description = "works"

    class OldStyle(Sampler):  # a plugin written for contract v1: no api_version, num_steps + sample(checkpoint)
        name = "old"
        description = "v1"

        def num_steps(self, checkpoint, steps):
            return 1

    class Misnamed(Sampler):
        api_version = 2
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
        importlib.metadata.EntryPoint("old", "fake_ddpmctl_plugins:OldStyle", group),
        importlib.metadata.EntryPoint("twice", "fake_ddpmctl_plugins:Fine", group),
        importlib.metadata.EntryPoint("twice", "fake_ddpmctl_plugins:Misnamed", group),
        *samplers.registry._entry_points(),  # the real ones keep working beside the broken
    ]
    calls: list[int] = []

    def fake() -> list[importlib.metadata.EntryPoint]:
        calls.append(1)
        return eps

    monkeypatch.setattr(samplers.registry, "_entry_points", fake)
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
    assert entries["old"].incompatible and not entries["old"].ok
    assert "written for sampler API v1" in (entries["old"].error or "")
    for name in BUILTINS:
        assert entries[name].ok
    assert get_sampler("fine").name == "fine"
    with pytest.raises(SamplerError, match="installed but broken: cannot import"):
        get_sampler("broken")
    with pytest.raises(SamplerError, match="installed but incompatible: .*written for sampler API v1"):
        get_sampler("old")
    with pytest.raises(UnknownSamplerError, match="installed samplers: ancestral, cld-ode, ddgan, ddim, dpmpp-2m, em, fine") as info:
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
    assert not rows["old"]["ok"] and rows["old"]["incompatible"] and "incompatible" in table.stdout


def test_sample_with_a_v1_plugin_is_one_line(fake_plugins: list[int], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ddpmctl.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tmp_path / "any.safetensors"), "--sampler", "old",
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sampler 'old' is installed but incompatible"), lines


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
    with pytest.raises(SamplerError, match="option eta=-0.1 must be at least 0"):
        parse_options(ddim, ["eta=-0.1"])
    with pytest.raises(SamplerError, match="option eta=1.5 must be at most 1"):
        parse_options(ddim, ["eta=1.5"])
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
    ROOT / "examples" / "ddpmctl-heun" / "ddpmctl_heun" / "__init__.py"]


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


def test_the_readme_plugin_passes_the_contract() -> None:
    # The plugin shown in full in README.md runs as written.
    text = (ROOT / "README.md").read_text()
    block = text.split("This is a complete plugin:\n\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    check_sampler(namespace["EulerSampler"])


def test_a_plugin_reading_pred_x0_keeps_working() -> None:
    """``Prediction.x0``, the name plugins written before 0.2 use, is the predicted clean image ``pred_xstart``."""
    from ddpmctl import Prediction

    pred_xstart, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    prediction = Prediction(pred_xstart=pred_xstart, eps=eps)
    assert prediction.x0 is pred_xstart and prediction.pred_xstart is pred_xstart
