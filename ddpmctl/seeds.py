"""Seeds derived from the user's ``--seed``: every random stream of ddpmctl is named by integer keys under it."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream named by ``keys`` (a rank, a stage) of run seed ``seed``."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
