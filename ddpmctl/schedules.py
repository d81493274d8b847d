"""Beta schedules for the forward process (Ho et al. 2020 linear; Nichol & Dhariwal 2021 cosine, eq. 17)."""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("linear", "cosine")


def beta_schedule(name: str, T: int) -> torch.Tensor:
    """The named beta schedule for a chain of ``T`` steps, as a float64 tensor [T] (docs/conventions.md #1-2)."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"the number of diffusion steps must be an integer >= 1, got {T!r}")
    T = int(T)
    if name == "linear":
        return torch.from_numpy(linear_betas(T))
    if name == "cosine":
        return torch.from_numpy(cosine_betas(T))
    raise ValueError(f"unknown beta schedule {name!r}: choose one of {', '.join(SCHEDULES)}")


def linear_betas(T: int) -> np.ndarray:
    """Ho et al.'s linear schedule rescaled so any T behaves like T = 1000 (IDDPM ``get_named_beta_schedule``)."""
    scale = 1000 / T
    # numpy's linspace, both ends included, so the values match the reference bit for bit.
    return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)


def _cosine_alpha_bar(u: float) -> float:
    """abar(u) = cos^2((u + s)/(1 + s) * pi/2), s = 0.008 (IDDPM eq. 17, unnormalised: f(0) cancels in ratios)."""
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(T: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM cosine schedule: beta_k = min(1 - abar((k+1)/T) / abar(k/T), 0.999), in Python floats as the reference."""
    betas = [min(1 - _cosine_alpha_bar((k + 1) / T) / _cosine_alpha_bar(k / T), max_beta) for k in range(T)]
    return np.array(betas, dtype=np.float64)
