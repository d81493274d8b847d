"""Beta schedules for the forward process (Ho et al. 2020 linear; Nichol & Dhariwal 2021 cosine, eq. 17; the
discretised VP-SDE of denoising diffusion GANs, Xiao et al. 2022 Sec. 3 and App. B)."""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("linear", "cosine", "vp-sde")

# The VP-SDE of DDGAN (Song et al. 2021 eq. 33 with its beta_min, beta_max; Xiao et al. 2022 App. B): the chain's
# T + 1 times start at VP_T_MIN, not 0, where the SDE's noise scale is singular.
VP_BETA_MIN = 0.1
VP_BETA_MAX = 20.0
VP_T_MIN = 1e-3


def beta_schedule(name: str, T: int) -> torch.Tensor:
    """The named beta schedule for a chain of ``T`` steps, as a float64 tensor [T] (docs/conventions.md #1-2)."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"the number of diffusion steps must be an integer >= 1, got {T!r}")
    T = int(T)
    if name == "linear":
        return torch.from_numpy(linear_betas(T))
    if name == "cosine":
        return torch.from_numpy(cosine_betas(T))
    if name == "vp-sde":
        return torch.from_numpy(vp_sde_betas(T))
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


def vp_sde_betas(T: int, beta_min: float = VP_BETA_MIN, beta_max: float = VP_BETA_MAX,
                 t_min: float = VP_T_MIN) -> np.ndarray:
    """DDGAN's chain of T steps from the VP-SDE (docs/ddgan.md "The chain"), float64 [T].

    The SDE's signal scale is abar(tau) = exp(-beta_min tau - (beta_max - beta_min) tau^2 / 2); the times are
    tau_i = t_min + (1 - t_min) i / T for i = 0..T, and beta_k = 1 - abar(tau_{k+1}) / abar(tau_k), k = 0..T-1.
    The data x_0 sits at tau_0 (about clean), so the chain's alphas_cumprod is abar(tau_{k+1}) / abar(tau_0).
    """
    tau = t_min + (1.0 - t_min) * np.arange(T + 1, dtype=np.float64) / T
    log_abar = -beta_min * tau - 0.5 * (beta_max - beta_min) * tau**2
    # 1 - exp(difference of logs): -expm1 keeps the small first beta exact at large T.
    return -np.expm1(log_abar[1:] - log_abar[:-1])
