"""Shared test set-up: serial, one thread (the test models are tiny: threads only add overhead, and
oversubscription on 2 cores is brutal), deterministic."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

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
