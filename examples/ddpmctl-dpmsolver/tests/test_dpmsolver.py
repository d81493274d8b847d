"""The plugin passes ddpmctl's sampler contract and solves the ODE of Gaussian data (closed form) to second order."""

from __future__ import annotations

import math

import torch
from ddpmctl.build import build_diffusion
from ddpmctl.config import DiffusionConfig
from ddpmctl.samplers import SampleRNG
from ddpmctl.testing import ExactGaussianDenoiser, check_sampler, exact_checkpoint

from ddpmctl_dpmsolver import DPMSolverSampler

M, S, T = 0.1, 0.3, 200


def test_contract() -> None:
    check_sampler(DPMSolverSampler)
    check_sampler(DPMSolverSampler, steps=5)  # below 10 steps: first-order last ODE step
    check_sampler(DPMSolverSampler, steps=10, options=DPMSolverSampler.Options(spacing="ddim"))


def _std(steps: int) -> float:
    dconf = DiffusionConfig(schedule="cosine", timesteps=T, var_type="fixed_small", loss_type="mse")
    ckpt = exact_checkpoint(ExactGaussianDenoiser(M, S, build_diffusion(dconf).alphas_cumprod), channels=1, image_size=64,
                            diffusion=dconf)
    rng = SampleRNG(0, range(16))  # the same x_T for every step count: the differences are the solver's error
    sampler = DPMSolverSampler(DPMSolverSampler.Options(clip_denoised=False))
    return float(sampler.sample(ckpt, rng.randn((1, 64, 64)), steps=steps, rng=rng).double().std())


def test_gaussian_data_second_order() -> None:
    # x0 ~ N(m, s^2): the exact denoiser is linear and the ODE maps N(0, 1) onto N(m, s^2) (then x_hat at the least
    # noisy step shrinks the std by a known factor). 50 steps land within a few percent; halving the step size
    # cuts the error about 4x (second order; DDIM, first order, would only halve it).
    abar0 = float(build_diffusion(DiffusionConfig(schedule="cosine", timesteps=T)).alphas_cumprod[0])
    limit = S * math.sqrt(abar0 * S**2 / (abar0 * S**2 + 1 - abar0))
    fine = _std(T)  # every step of the chain
    assert abs(fine / limit - 1) < 0.01
    err50, err100 = _std(50) - fine, _std(100) - fine
    assert abs(err50) < 0.03 * S
    assert abs(err100) < abs(err50) / 3
