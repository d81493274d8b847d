"""`dpmpp-2m`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), a second-order multistep probability-flow ODE solver.

Notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log alpha_t - log sigma_t (half log-SNR),
x_hat = the denoiser's (clipped) data prediction (``pred_xstart``). The steps t_0 > ... > t_{n-1} default to the top
step, then uniform in lambda over the range where the image forms (on an even-in-t cosine grid the first and last steps are
5-20x longer in lambda than the others):

- low end, lambda = -3 for an eps network and -1.5 for a v or x0 one. An eps network's x_hat = (x - sigma eps)/alpha
  multiplies its error by sigma/alpha = e^-lambda; below lambda of about -2 the clipped x_hat swings between -1 and 1
  and the trajectory needs short steps there. A v or x0 network's x_hat stays bounded, and steps spent above
  lambda = -1.5 (nearly pure noise) are lost.
- high end, lambda = 3.5 (sigma/alpha = 0.03, about 4 grey levels of an 8-bit image). The last step returns
  x_hat = E[x_0 | x] there, which shrinks every sample towards the mean by sqrt(s^2 / (s^2 + (sigma/alpha)^2)) for
  data of spread s more than the ODE does: the cost of stopping early, against the discretisation error of wider
  2M steps. On Gaussian data (``ddpmctl.testing.gaussian_ode_error``, measured against the exact sigma = 0
  endpoint) a 10-step grid is 2-3e-3 RMS from it with this end, 1.1-1.2e-2 ending at 2.5 (4% too narrow) and
  0.8-1.1e-2 ending at the chain's bottom step; a long final 2M step to the bottom step (an uneven grid) is worse.
- Past 10 steps both ends move out by a quarter of the 10-step spacing per extra step, up to the whole chain: by about
  20 steps the grid ends at the chain's bottom step.

Measured by FD on digits models (benchmarks/README.md "Few-step sample quality", which lists the grids tried):
at 10 steps the high end of 3.5 scored best or level among 2.5 / 3.5 / 4.5 / the chain's bottom step at every low
end tried, on both models, and the low ends (-3 for eps, -1.5 for v) scored best of those tried.

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
from pydantic import Field, model_validator

from ddpmctl import Denoiser, Sampler, SampleRNG, SamplerError, StepCallback, StepInfo


# The default logsnr grid (module docstring): its low end by the network's prediction, its high end at 10 steps.
EPS_LAMBDA_MIN = -3.0
LAMBDA_MIN = -1.5
TEN_STEP_LAMBDA_MAX = 3.5


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
        lambda_min: float | None = Field(
            None, description="logsnr spacing: lambda = log(alpha/sigma) after the top step (default at 10 steps: -3 "
                              "for eps networks, -1.5 for v and x0; lower with more steps)")
        lambda_max: float | None = Field(
            None, description="logsnr spacing: lambda of the last step before sigma = 0 (default: 3.5 up to 10 "
                              "steps, then farther, up to the chain's bottom step)")

        @model_validator(mode="after")
        def _ordered(self) -> DPMSolverPlusPlus2MSampler.Options:
            given = [f"{key}={value:g}" for key, value in (("lambda_min", self.lambda_min),
                                                           ("lambda_max", self.lambda_max)) if value is not None]
            if given and self.spacing != "logsnr":
                verb = "apply" if len(given) > 1 else "applies"
                raise ValueError(f"{' and '.join(given)} {verb} only to spacing=logsnr, not spacing={self.spacing}")
            if self.lambda_min is not None and self.lambda_max is not None and self.lambda_min >= self.lambda_max:
                raise ValueError(f"lambda_min must be below lambda_max, not {self.lambda_min:g} >= {self.lambda_max:g}")
            return self

    def log_snr_span(self, mean_type: str, steps: int, bottom: float) -> tuple[float, float]:
        low0 = EPS_LAMBDA_MIN if mean_type == "eps" else LAMBDA_MIN
        # Past 10 steps the range widens by half the 10-step spacing per extra step, a quarter at each end: at 20
        # steps the middle is still denser than at 10, by 50 steps the grid covers the whole chain.
        widen = max(0, steps - 10) * (TEN_STEP_LAMBDA_MAX - low0) / 8 / 4
        default_low, default_high = low0 - widen, min(bottom, TEN_STEP_LAMBDA_MAX + widen)
        low = default_low if self.options.lambda_min is None else self.options.lambda_min
        high = default_high if self.options.lambda_max is None else self.options.lambda_max
        # One end given and the default other end on its wrong side: say which end was a default.
        if self.options.lambda_max is None and low >= high:
            raise SamplerError(f"option lambda_min={low:g} is not below the default high end at {steps} steps "
                               f"(lambda {high:g}): give lambda_max as well")
        if self.options.lambda_min is None and low >= high:
            raise SamplerError(f"option lambda_max={high:g} is not above the default low end at {steps} steps "
                               f"(lambda {low:g}): give lambda_min as well")
        return low, high

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        n = len(timesteps)
        alpha = [math.sqrt(denoiser.alpha_bar(t)) for t in timesteps]
        sigma = [math.sqrt(1.0 - denoiser.alpha_bar(t)) for t in timesteps]
        lam = [denoiser.log_snr(t) for t in timesteps]
        x = x_T
        pred_xstart_prev: torch.Tensor | None = None
        h_prev = 0.0
        for i, t in enumerate(timesteps):
            pred_xstart = denoiser.predict(x, t, clip=self.options.clip_denoised).pred_xstart  # 1. data prediction
            if i == n - 1:
                x = pred_xstart  # 2. The final step, to sigma = 0: e^{-h} = 0, the first-order update is x_hat
            else:
                h = lam[i + 1] - lam[i]
                # 3. D: x_hat at the first step (order 1, DDIM), then the 2M extrapolation of x_hat linear in lambda.
                d = pred_xstart if pred_xstart_prev is None else (
                    pred_xstart + (pred_xstart - pred_xstart_prev) / (2.0 * (h_prev / h)))
                # 4. The linear part exactly, the x_hat integral by D (DPM-Solver++ eq. 9).
                x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
                h_prev = h
            pred_xstart_prev = pred_xstart
            if callback is not None:
                callback(StepInfo(index=i, total=n, t=t, x=x, pred_xstart=pred_xstart))
        return x
