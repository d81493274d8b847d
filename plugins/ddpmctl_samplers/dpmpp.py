"""`dpmpp-2m`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), a second-order multistep probability-flow ODE solver.

Notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log alpha_t - log sigma_t (half log-SNR),
x_hat = the denoiser's (clipped) data prediction. The steps t_0 > ... > t_{n-1} default to uniform in lambda,
where the solver's error is spread evenly (on an even-in-t cosine grid the first and last steps are 5-20x longer
in lambda than the others).

Steps are ODE steps: the n network calls make n steps t_0 -> t_1 -> ... -> t_{n-1} -> sigma = 0. The last one
is the "lower-order final" step of the reference, first order by necessity (h is infinite there, and the
first-order update to sigma = 0 is x_hat itself); every step before it but the first is second order. On the
Gaussian check of ``ddpmctl.testing.gaussian_ode_error`` an extra first-order step before it (the reference's rule
for fewer than 10 steps) doubles the error at 5-10 steps (benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from ddpmctl import Denoiser, Sampler, SampleRNG, StepCallback, StepInfo


class DPMSolverPlusPlus2MSampler(Sampler):
    """x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D_i, h = lambda_{i+1} - lambda_i, with
    D_0 = x_hat_0 (a DDIM step) and D_i = x_hat_i + (x_hat_i - x_hat_{i-1}) / (2 r), r = h_{i-1} / h_i; the last
    step goes to sigma = 0, where the update is x_hat itself."""

    api_version = 2
    name = "dpmpp-2m"
    description = "DPM-Solver++(2M): deterministic 2nd-order ODE solver, logSNR-uniform steps (Lu et al. 2022)"
    default_steps = 20

    class Options(Sampler.Options):
        spacing: Literal["logsnr", "even", "ddim"] = Field(
            "logsnr", description="logsnr: uniform in log-SNR; even: K evenly spaced steps; ddim: range(0, T, i)")
        clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every step")

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        n = len(timesteps)
        alpha = [math.sqrt(denoiser.alpha_bar(t)) for t in timesteps]
        sigma = [math.sqrt(1.0 - denoiser.alpha_bar(t)) for t in timesteps]
        lam = [denoiser.log_snr(t) for t in timesteps]
        x = x_T
        x_hat_prev: torch.Tensor | None = None
        h_prev = 0.0
        for i, t in enumerate(timesteps):
            x_hat = denoiser.predict(x, t, clip=self.options.clip_denoised).x0  # 1. data prediction
            if i == n - 1:
                x = x_hat  # 2. The final step, to sigma = 0: e^{-h} = 0 and the first-order update is x_hat
            else:
                h = lam[i + 1] - lam[i]
                # 3. D: x_hat at the first step (order 1, DDIM), then the 2M extrapolation of x_hat linear in lambda.
                d = x_hat if x_hat_prev is None else x_hat + (x_hat - x_hat_prev) / (2.0 * (h_prev / h))
                # 4. The linear part exactly, the x_hat integral by D (DPM-Solver++ eq. 9).
                x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
                h_prev = h
            x_hat_prev = x_hat
            if callback is not None:
                callback(StepInfo(index=i, total=n, t=t, x=x, pred_xstart=x_hat))
        return x
