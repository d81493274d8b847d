"""Shared test set-up: serial, one thread (the test models are tiny: threads only add overhead, and
oversubscription on 2 cores is brutal), deterministic."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

TEST_THREADS = int(os.environ.get("DDPMCTL_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    """Every test starts seeded and on TEST_THREADS threads, whatever the previous test (or train()) set."""
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _cpu_without_native_bf16(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision auto resolves to fp32 in every test, whatever CPU runs the suite (test_hardware probes for real)."""
    if request.module.__name__.rsplit(".", 1)[-1] != "test_hardware":
        import ddpmctl.hardware

        monkeypatch.setattr(ddpmctl.hardware, "cpu_native_bf16", lambda: False)


@pytest.fixture
def poison_losses(monkeypatch: pytest.MonkeyPatch) -> Callable[[float, set[int]], None]:
    """``poison_losses(value, calls)``: add ``value`` (nan, inf) to the loss of those 1-based compute_losses calls."""
    import ddpmctl.train as train_module

    def poison(value: float, bad_calls: set[int]) -> None:
        real = train_module.compute_losses
        calls = {"n": 0}

        def fake(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
            calls["n"] += 1
            losses = real(*args, **kwargs)
            if calls["n"] in bad_calls:
                losses = {**losses, "loss": losses["loss"] + value}
            return losses

        monkeypatch.setattr(train_module, "compute_losses", fake)

    return poison


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
