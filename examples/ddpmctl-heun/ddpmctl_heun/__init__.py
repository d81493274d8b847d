"""Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, "EDM", Algorithm 1, deterministic).

A complete third-party sampler plugin for ddpmctl's sampler API v2: it imports only ``ddpmctl``'s public names,
torch and pydantic. In EDM's variables y = x / alpha and s = sigma / alpha the ODE is dy/ds = eps(y, s), the noise
the denoiser predicts; an Euler step in s is exactly a DDIM step, and Heun averages eps at both ends of the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from ddpmctl import CLEAN, Denoiser, Sampler, SampleRNG, StepCallback, StepInfo

__version__ = "0.2.0"


class HeunSampler(Sampler):
    """y_{i+1} = y_i + (s_{i+1} - s_i) (eps_i + eps'_{i+1}) / 2, eps' taken at the Euler estimate of y_{i+1};
    the first step (from pure noise) and the last (to s = 0, landing on the denoiser's x_0) are Euler. Two network
    calls per step, one for the first and the last."""

    api_version = 2
    name = "heun"
    description = "Heun 2nd-order ODE solver (EDM, Karras et al. 2022): 2 network calls per inner step"
    default_steps = 10

    class Options(Sampler.Options):
        # Even in t (dense at low noise on a cosine chain, like EDM's rho = 7 grid): Heun's explicit steps in s are
        # unstable over the long low-noise steps of a log-SNR grid (error 0.17 vs 0.014 at 10 steps, Gaussian check).
        spacing: Literal["even", "ddim", "logsnr"] = Field(
            "even", description="even: K evenly spaced steps (IDDPM); ddim: range(0, T, i); logsnr: uniform in log-SNR")
        clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every call")

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        clip = self.options.clip_denoised
        x = x_T
        for i, t in enumerate(timesteps):
            pred = denoiser.predict(x, t, clip=clip)
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
            if t_next == CLEAN:
                x = pred.pred_xstart  # Euler to s = 0: y - s eps = x_0
            else:
                alpha, sigma = math.sqrt(denoiser.alpha_bar(t)), math.sqrt(1 - denoiser.alpha_bar(t))
                alpha_n, sigma_n = math.sqrt(denoiser.alpha_bar(t_next)), math.sqrt(1 - denoiser.alpha_bar(t_next))
                # In x = alpha y: x_next = alpha_n (x / alpha + ds * eps), ds = s_next - s (float64 scalars, so the
                # large s at the top of a chain never meets float32).
                scale, step = alpha_n / alpha, alpha_n * (sigma_n / alpha_n - sigma / alpha)
                x_prev = x
                x = scale * x + step * pred.eps  # 1. Euler (= DDIM)
                if i > 0:
                    # 2. Heun: the slope at the end of the step, averaged with the one at its start. Not on the
                    #    first step: from the top of the chain (s ~ 1e4-1e5, where EDM would start at 80) eps
                    #    changes completely over the step (error 7.7 instead of 0.014 at 10 steps).
                    eps_next = denoiser.predict(x, t_next, clip=clip).eps
                    x = scale * x_prev + step * 0.5 * (pred.eps + eps_next)
            if callback is not None:
                callback(StepInfo(index=i, total=len(timesteps), t=t, x=x, pred_xstart=pred.pred_xstart))
        return x
