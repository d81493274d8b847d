"""Shared test set-up: serial, one thread (the test models are tiny: threads only add overhead, and
oversubscription on 2 cores is brutal), deterministic, and one fixed CPU class whatever machine runs the suite.

The CPU class (``--cpu-profile``, else ``DDPMCTL_CPU``, else DEFAULT_CPU_PROFILE) is exported as ``DDPMCTL_CPU``,
so subprocesses and torchrun ranks choose as this process does; a class below the machine's also runs that class's
kernels (ddpmctl.cpuclass). ``@pytest.mark.every_cpu`` runs a test once per class (the ``cpu_class`` fixture):
there the class decides precision and fast paths in this process, and its kernels too in child processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from ddpmctl import cpuclass

TEST_THREADS = int(os.environ.get("DDPMCTL_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

# A fixed class, not the machine's, so the suite takes the same paths everywhere: AVX-512 without bf16 (auto = fp32,
# channels_last training). .ci/run runs the fast suite again under a second class; every_cpu tests run under all.
DEFAULT_CPU_PROFILE = "avx512"
KERNEL_LIMIT_NAMES = sorted({name for limits in cpuclass.KERNEL_LIMITS.values() for name in limits})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-profile", choices=("native", *cpuclass.CPU_CLASSES), default=None,
                     help=f"the CPU class ddpmctl chooses for in every test and subprocess (default: $DDPMCTL_CPU, "
                          f"else {DEFAULT_CPU_PROFILE}; native = this machine)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "every_cpu: run the test once under every CPU class (fixture cpu_class)")
    profile = config.getoption("--cpu-profile") or os.environ.get(cpuclass.CPU_ENV) or DEFAULT_CPU_PROFILE
    os.environ[cpuclass.CPU_ENV] = profile
    try:
        cpuclass.simulated_cpu_class()
    except cpuclass.CpuClassError as err:
        raise pytest.UsageError(str(err)) from None
    # Before any test runs a tensor operation: torch and oneDNN read their kernel limits once per process.
    cpuclass.lower_kernels_to_cpu_class()


def pytest_report_header(config: pytest.Config) -> str:
    from ddpmctl import hardware

    limits = " ".join(f"{name}={os.environ[name]}" for name in KERNEL_LIMIT_NAMES if name in os.environ)
    return (f"ddpmctl CPU profile: {os.environ[cpuclass.CPU_ENV]} (chooses as {hardware.cpu_class()}, torch kernels "
            f"{hardware.kernel_capability()}{', ' + limits if limits else ''}); this machine: "
            f"{hardware.hardware_cpu_class()}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("every_cpu"):
        if "cpu_class" not in metafunc.fixturenames:
            metafunc.fixturenames.append("cpu_class")
        metafunc.parametrize("cpu_class", cpuclass.CPU_CLASSES, indirect=True)


@pytest.fixture
def cpu_class(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The class this test runs under: its every_cpu parameter (exported with its kernel limits, for child
    processes), else the session's profile (``native`` as this machine's class)."""
    from ddpmctl import hardware

    name = getattr(request, "param", None)
    if name is None:
        return hardware.cpu_class()
    monkeypatch.setenv(cpuclass.CPU_ENV, name)
    for limit in KERNEL_LIMIT_NAMES:
        monkeypatch.delenv(limit, raising=False)
    for limit, value in cpuclass.lower_kernels_to_cpu_class({}).items():
        monkeypatch.setenv(limit, value)
    return name


def auto_precision(cpu_class: str) -> str:
    """What ``--precision auto`` must pick on the CPU ``cpu_class``: bf16 only where it is native."""
    return "bf16" if cpu_class == "avx512-bf16" else "fp32"


@pytest.fixture(autouse=True)
def _seed_threads_and_fresh_choices() -> Iterator[None]:
    """Every test starts seeded, on TEST_THREADS threads, and with no fast-path choice cached by an earlier test."""
    from ddpmctl import hardware

    hardware.clear_caches()
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)
    hardware.clear_caches()


class LossPoison:
    """``poison(value, calls)``: add ``value`` (nan, inf) to the loss of those 1-based compute_losses calls;
    ``poison.stop()`` takes every such patch away again (and nothing else the test patched)."""

    def __init__(self) -> None:
        self._patch = pytest.MonkeyPatch()

    def __call__(self, value: float, bad_calls: set[int]) -> None:
        import ddpmctl.train as train_module

        real = train_module.compute_losses
        calls = {"n": 0}

        def fake(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
            calls["n"] += 1
            losses = real(*args, **kwargs)
            if calls["n"] in bad_calls:
                losses = {**losses, "loss": losses["loss"] + value}
            return losses

        self._patch.setattr(train_module, "compute_losses", fake)

    def stop(self) -> None:
        self._patch.undo()


@pytest.fixture
def poison_losses() -> Iterator[LossPoison]:
    poison = LossPoison()
    yield poison
    poison.stop()


# ------------------------------------------------------------------------------------- helpers shared by test files
# Test files import these with ``from conftest import ...`` (pytest puts tests/ on sys.path).
def tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (checkpoint or training state)."""
    from ddpmctl.fileio import load_tensors

    return load_tensors(path)[0]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> None:
    """Same keys, and every tensor bit for bit equal."""
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_same_files(a: Path, b: Path, names: list[str]) -> None:
    """The safetensors files ``names`` hold bit-identical tensors in folders ``a`` and ``b``."""
    for name in names:
        assert_same(tensors(a / name), tensors(b / name), f"{b.name}/{name}")


def perturb_weights(model: torch.nn.Module, std: float, *, only_zero: bool = False,
                    generator: torch.Generator | None = None) -> torch.nn.Module:
    """Give a freshly built U-Net input-dependent outputs: its zero-initialised output layers would make every
    prediction 0. Adds N(0, std^2) noise to every parameter, or with ``only_zero`` fills just the all-zero ones.
    Draws from ``generator`` (else the global RNG); returns ``model``."""
    with torch.no_grad():
        for p in model.parameters():
            if only_zero:
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
            else:
                p.add_(std * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture
def one_rank_group() -> Iterator[object]:
    """A gloo process group of this process alone (the collectives and DDP's buckets work with one rank);
    yields its :class:`ddpmctl.distributed.DistInfo`. Failing to start it fails the test: it never skips."""
    import socket

    import torch.distributed as dist

    from ddpmctl.distributed import DistInfo

    assert not dist.is_initialized()
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield DistInfo(rank=0, world_size=1)
    finally:
        dist.destroy_process_group()


def invoke_cli(*args: str) -> object:
    """Run ``ddpmctl ARGS`` in process (typer's CliRunner); returns its Result."""
    from typer.testing import CliRunner

    from ddpmctl.cli.app import app

    return CliRunner().invoke(app, list(args))


def one_error_line(result: object, code: int) -> str:
    """Exit ``code`` and exactly one 'error: ...' line on stderr, no traceback; returns that line."""
    assert result.exit_code == code, result.output  # type: ignore[attr-defined]
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output  # type: ignore[attr-defined]
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    return lines[0]


@pytest.fixture(scope="session", name="runs")
def resume_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny fp32 run of builtin:digits saved at steps 3 and 6 ("run6"), and the same run trained to step 8 without
    interruption ("run8"): what a resume of run6 to step 8 must end at, bit for bit."""
    from ddpmctl.config import TrainConfig
    from ddpmctl.train import train

    tiny = dict(data="builtin:digits", model_channels=16, channel_mult=(1, 2), res_blocks=1,
                attention_resolutions=(4,), timesteps=20, batch_size=16, save_every=3, log_every=3, precision="fp32")
    root = tmp_path_factory.mktemp("resume_runs")
    for name, steps in (("run6", 6), ("run8", 8)):
        torch.manual_seed(0)
        train(TrainConfig(**tiny, out=str(root / name), max_steps=steps), device=torch.device("cpu"))
    return {"run6": root / "run6", "run8": root / "run8"}
