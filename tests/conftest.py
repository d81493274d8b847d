"""Shared test set-up: serial, one thread (the test models are tiny: threads only add overhead, and
oversubscription on 2 cores is brutal), deterministic."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DDPMCTL_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
