"""Shared test set-up: serial, one thread (the test models are tiny: threads only add overhead, and
oversubscription on 2 cores is brutal), deterministic."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
